"""The README stays true: its config reference is the generated one, and it states the CI test command."""

from __future__ import annotations

import re
from pathlib import Path

from dittune.config.docs import END_MARKER, START_MARKER, update_readme_section

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"


def test_config_reference_is_current() -> None:
    text = README.read_text(encoding="utf-8")
    assert text.count(START_MARKER) == 1 and text.count(END_MARKER) == 1
    assert update_readme_section(text) == text, (
        "README.md's config reference differs from the schema; regenerate it with: python scripts/update_readme.py"
    )


def test_readme_states_the_command_ci_runs() -> None:
    ci = CI_SCRIPT.read_text(encoding="utf-8")
    commands = [c.strip() for c in re.findall(r"^\s*(python -m pytest\b[^|;&#\n]*)", ci, flags=re.MULTILINE)]
    assert len(commands) == 1, f"{CI_SCRIPT} should run exactly one pytest command, found {commands}"
    assert f"\n{commands[0]}\n" in README.read_text(encoding="utf-8")


def test_readme_quickstart_and_examples_exist() -> None:
    text = README.read_text(encoding="utf-8")
    assert "bash scripts/quickstart.sh" in text
    assert (ROOT / "scripts" / "quickstart.sh").is_file()
    for link in re.findall(r"\]\(((?:docs|examples)/[^)#]*)", text):
        assert (ROOT / link).exists(), f"README links to missing {link}"
