"""benchmarks/gpu.sh's Python part runs (CPU smoke mode) and writes its results table; gpu.sh refuses without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_gpu_step_smoke_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_step

    out = tmp_path / "gpu.md"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = gpu_step.main(
            [
                "--device", "cpu", "--tiny", "--layers", "2", "--size", "32", "--methods", "lora",
                "--precisions", "fp32", "--checkpointing", "on", "--steps", "1", "--rounds", "1", "--warmup", "0",
                "--memory-steps", "1", "--backend", "eager", "--write", str(out),
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    text = out.read_text()
    assert "- command: `python benchmarks/gpu_step.py --device cpu --tiny" in text
    rows = [line for line in text.splitlines() if line.startswith(("| lora |", "| full |"))]
    assert len(rows) == 2  # eager and compiled
    assert all("| fp32 | on |" in row for row in rows)
    assert "**" in rows[1] and "**" not in rows[0]  # the compiled ÷ eager ratio on the compiled row


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_sh_refuses_without_cuda() -> None:
    env = {**os.environ, "DITTUNE_PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh")], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 2
    assert "no usable CUDA GPU" in result.stderr and "install a CUDA build" in result.stderr
