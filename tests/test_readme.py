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


def test_formats_doc_key_maps_are_current() -> None:
    """docs/formats.md's tables are the ones rendered from the family layouts the converters run."""
    from dittune.export.formats_doc import update_section

    text = (ROOT / "docs" / "formats.md").read_text(encoding="utf-8")
    assert update_section(text) == text, "docs/formats.md is out of date: python scripts/update_readme.py"
    assert "`blocks.{i}.attn1.Wqkv`" in text and "A stacked, B block-diagonal" in text


def test_readme_states_the_command_ci_runs() -> None:
    """CI runs exactly the README's one test command, and that command runs pytest (with the slowest tests)."""
    ci_commands = re.findall(r"^\s*(bash scripts/\S+)", CI_SCRIPT.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert ci_commands == ["bash scripts/test.sh"], f"{CI_SCRIPT} should run exactly bash scripts/test.sh"
    assert "\nbash scripts/test.sh\n" in README.read_text(encoding="utf-8")
    script = (ROOT / "scripts" / "test.sh").read_text(encoding="utf-8")
    pytest_lines = [line for line in script.splitlines() if "-m pytest" in line and not line.lstrip().startswith("#")]
    assert len(pytest_lines) == 1 and "--durations=10" in pytest_lines[0]


def test_readme_quickstart_and_examples_exist() -> None:
    text = README.read_text(encoding="utf-8")
    assert "bash scripts/quickstart.sh" in text
    assert (ROOT / "scripts" / "quickstart.sh").is_file()
    for link in re.findall(r"\]\(((?:docs|examples)/[^)#]*)", text):
        assert (ROOT / link).exists(), f"README links to missing {link}"
