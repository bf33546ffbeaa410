"""What a resume may and may not change.

- The training data's content may not: a checkpoint records a fingerprint of every planned sample (the content
  hash of its file, its caption and its control image), and a resume whose data differs is refused right after
  the run plans its data (before anything is encoded or the model loads), naming the first changed files. The
  file hashes come from the cache's fingerprint memo (`CACHE/fingerprints.json`), so an unchanged file is not
  read again.
- The learning rate (and weight decay) may: the optimizer and schedule state of the checkpoint carry the old
  value, so after loading, the schedule's base rates and the optimizer's groups are moved to the new one and the
  schedule continues from the resumed step with it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dittune.config.schema import DittuneConfig
from dittune.data.report import DatasetPlan
from dittune.fingerprint import Fingerprinter, FingerprintMode
from dittune.train.checkpoint import STATE_FILE

FINGERPRINT_VERSION = 1
_DIGITS = 16
"""Hex digits kept of each hash: 64 bits, plenty to notice a change, and a small trainer_state.json."""
MAX_NAMED = 5
"""Changed samples named in a refusal; the rest are counted."""
_PARTS = ("content", "caption", "control image")


def _short(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_DIGITS]


def data_fingerprint(plan: DatasetPlan, fingerprinter: Fingerprinter, mode: FingerprintMode) -> dict[str, Any]:
    """The fingerprint of the planned samples: `{"version", "mode", "samples": {key: "FILE CAPTION [CONTROL]"}}`.

    FILE and CONTROL are the files' fingerprints as the cache keys use them (content hashes, memoised by
    `fingerprinter`; path + size + mtime in "stat" mode), CAPTION the hash of the caption text, each shortened to
    16 hex digits. A file that cannot be read counts as "unreadable" (the cache fill reports it)."""

    def file(path: Path) -> str:
        try:
            return _short(fingerprinter.file(path, mode))
        except OSError:
            return "unreadable"

    samples = {}
    for sample in plan.samples:
        parts = [file(sample.record.path), _short(sample.record.caption)]
        if sample.record.control is not None:
            parts.append(file(sample.record.control))
        samples[sample.key] = " ".join(parts)
    return {"version": FINGERPRINT_VERSION, "mode": mode, "samples": samples}


def data_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per sample that differs between two fingerprints ("KEY (caption changed)"), in key order.

    When the fingerprint mode differs (`cache.source_fingerprint` was switched), file hashes cannot be compared:
    only the samples and their captions are."""
    files_comparable = saved.get("mode") == current.get("mode")
    before, now = saved.get("samples", {}), current.get("samples", {})
    changes = []
    for key in sorted(before.keys() | now.keys()):
        if key not in now:
            changes.append(f"{key} (no longer in the data)")
        elif key not in before:
            changes.append(f"{key} (new)")
        else:
            old, new = before[key].split(" "), now[key].split(" ")
            differ = [
                name
                for index, name in enumerate(_PARTS)
                if (index == 1 or files_comparable) and _part(old, index) != _part(new, index)
            ]
            if differ:
                changes.append(f"{key} ({' and '.join(differ)} changed)")
    return changes


def _part(parts: list[str], index: int) -> str | None:
    return parts[index] if index < len(parts) else None


def check_resume_data(cfg: DittuneConfig, checkpoint: Path, current: dict[str, Any]) -> None:
    """Refuse (ValueError) to resume when the data's fingerprint `current` (the run's own plan, taken before
    anything is encoded or the model loads) differs from the checkpoint's; a checkpoint without one (written
    before fingerprints) resumes as it is."""
    state = json.loads((Path(checkpoint) / STATE_FILE).read_text())
    saved = state.get("data_fingerprint")
    if not saved:
        return
    changes = data_changes(saved, current)
    if not changes:
        return
    named = "; ".join(changes[:MAX_NAMED]) + (
        f"; and {len(changes) - MAX_NAMED} more" if len(changes) > MAX_NAMED else ""
    )
    stat = (
        ' (cache.source_fingerprint = "stat": a new size or modification time counts as a change)'
        if cfg.cache.source_fingerprint == "stat"
        else ""
    )
    raise ValueError(
        f"the training data in {cfg.data.path} changed since the checkpoint {checkpoint} was written: "
        f"{len(changes)} sample(s) differ{stat}: {named}. Resuming would not continue that run. Restore the data as "
        "it was, or start a new run in another output_dir."
    )


# ----------------------------------------------------------------- hyperparameters honoured on resume
def apply_changed_hyperparameters(
    run: Any, checkpoint: Path, step: int, say: Callable[[str], None] = print
) -> list[str]:
    """After the checkpoint is loaded: move the optimizer and schedule to the config's `train.learning_rate` and
    `train.weight_decay` where they differ from the checkpoint's; returns the lines printed (one per change).

    The learning rate scales every group's base rate by new / old, so the schedule (warmup, decay) continues
    from `step` as if the run had started with the new value. Nothing is touched when both are unchanged, so
    such a resume stays bit-identical to an uninterrupted run.
    """
    state = json.loads((Path(checkpoint) / STATE_FILE).read_text())
    saved = (state.get("config") or {}).get("train") or {}
    train = run.cfg.train
    lines = []
    old_lr = saved.get("learning_rate")
    if old_lr is not None and float(old_lr) != float(train.learning_rate):
        set_base_learning_rate(run.optimizer, run.lr_scheduler, float(old_lr), float(train.learning_rate))
        lines.append(
            f"learning_rate changed from {float(old_lr):g} to {train.learning_rate:g}: "
            f"the schedule continues from step {step} with the new value"
        )
    old_decay = saved.get("weight_decay")
    if old_decay is not None and float(old_decay) != float(train.weight_decay):
        for group in run.optimizer.param_groups:
            if "weight_decay" in group:
                group["weight_decay"] = train.weight_decay
        lines.append(f"weight_decay changed from {float(old_decay):g} to {train.weight_decay:g} from step {step} on")
    for line in lines:
        say(line)
    return lines


def set_base_learning_rate(optimizer: Any, scheduler: Any, old: float, new: float) -> None:
    """Rescale a schedule's base rates (and the groups' `initial_lr` and current `lr`) from `old` to `new`.

    A `LambdaLR` (every diffusers schedule) gets its current rate recomputed exactly as its next `step()` will:
    base × factor(step); other schedulers have their rates scaled by new / old."""
    groups = optimizer.param_groups
    bases = list(getattr(scheduler, "base_lrs", [group["lr"] for group in groups]))
    scaled = [new if base == old or not old else base * new / old for base in bases]  # exact for one group
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is not None and len(lambdas) == len(groups):
        current = [base * factor(scheduler.last_epoch) for base, factor in zip(scaled, lambdas)]
    else:
        current = [group["lr"] * new / old if old else new for group in groups]
    for group, base, lr in zip(groups, scaled, current):
        if "initial_lr" in group:
            group["initial_lr"] = base
        group["lr"] = lr
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = scaled
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = list(current)
