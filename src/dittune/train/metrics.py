"""Metrics: one JSON object per logged step in OUTPUT_DIR/metrics.jsonl, mirrored to trackers."""

from __future__ import annotations

import json
import os
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


class PhaseMemory:
    """Peak memory of each phase of a run, in MiB: `memory_caching_mb`, `memory_step_mb` (the steps since the
    last logged line) and `memory_validation_mb` (the validations since then) in metrics.jsonl.

    On CUDA, `torch.cuda.max_memory_allocated` since the phase began (`reset_peak_memory_stats`, no device sync).
    On a CPU only the process's resident high-water mark exists and it cannot be reset (resetting it through
    /proc would also hide the run's peak from `getrusage` of a parent process), so every reading is the peak
    of the run so far. `overall` is the highest reading: the run's peak, as `peak_memory_mb` reports it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: dict[str, float] = {}
        self.overall = 0.0
        self.begin()

    def begin(self) -> None:
        """A phase starts now."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def end(self, phase: str) -> float:
        """The peak of `phase` since `begin` (kept for `take`, the highest if it ran several times)."""
        value = peak_memory_mb(self.device)
        self.overall = max(self.overall, value)
        self.pending[phase] = max(self.pending.get(phase, 0.0), value)
        return value

    def take(self) -> dict[str, float]:
        """`memory_<phase>_mb` of the phases ended since the last call."""
        taken = {f"memory_{phase}_mb": value for phase, value in self.pending.items()}
        self.pending.clear()
        return taken


class MetricsLog:
    """Appends to metrics.jsonl; on resume, drops lines past the resumed step first."""

    def __init__(self, output_dir: Path, accelerator: Any, start_step: int = 0) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        if self.enabled and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= start_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")  # renamed into place: a kill never loses lines
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)

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
