"""Metrics: one JSON object per logged step in OUTPUT_DIR/metrics.jsonl, mirrored to trackers."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA) or the process's peak resident memory (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class MetricsLog:
    """Appends to metrics.jsonl; on resume, drops lines past the resumed step first."""

    def __init__(self, output_dir: Path, accelerator: Any, start_step: int = 0) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        if self.enabled and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")
        numeric = {k: v for k, v in values.items() if isinstance(v, int | float)}
        self.accelerator.log(numeric, step=step)


def _step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62
