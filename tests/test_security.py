"""No code runs from files dittune reads: weights from safetensors or `torch.load(weights_only=True)`, no pickles,
no remote code, no network at run time."""

from __future__ import annotations

import os
import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "dittune"


def _calls(pattern: str) -> list[str]:
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(pattern, code) and not code.lstrip().startswith(('"', "'", "`")):
                found.append(f"{path.relative_to(SOURCE)}:{number}: {line.strip()}")
    return found


def test_no_unguarded_unpickling_or_remote_code() -> None:
    loads = _calls(r"torch\.load\(")
    assert loads and all("weights_only=True" in line for line in loads), loads
    assert _calls(r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load") == []
    assert _calls(r"trust_remote_code\s*=\s*True") == []
    assert _calls(r"weights_only\s*=\s*False") == []


def test_commands_run_offline(monkeypatch) -> None:
    from dittune.cli.main import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert main(["--version"]) == 0
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
