"""Non-finite losses and gradient norms (`train.on_nonfinite`): noticed at the step they happen, acted on at
the next logged step, checkpoint or export.

"stop" keeps its bookkeeping on the device: each step folds whether its loss and grad norm were finite into
the first bad step (a `torch.where`, no read-back), and `pending`/`check` read that back only where the trainer
reads numbers anyway (a logged step) or is about to write weights (a checkpoint, the export), together with a
check of the trainable weights themselves. "skip" must decide before the optimizer steps, so it reads one flag
back every step.

Every process reaches the same decision: the grad norm from `accelerator.clip_grad_norm_` is already global,
and the per-process loss flags are gathered (at a check in "stop" mode, every step in "skip" mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dittune.errors import RunStopped
from dittune.train.checkpoint import complete_checkpoints

NONE = 2**62
"""The first bad step while there is none (a power of two, so float32 and float64 read it back exactly)."""
EXIT_STATUS = 1


class NonFiniteWatch:
    """Device-side record of non-finite steps and the decisions `train.on_nonfinite` asks for."""

    def __init__(self, mode: str, max_skips: int, accelerator: Any, output_dir: Path, learning_rate: float) -> None:
        self.mode = mode
        self.max_skips = max_skips
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.learning_rate = learning_rate
        self.first_bad: torch.Tensor | None = None
        """Int64 scalar on the device: the first step of this process whose loss or grad norm was not finite
        (`NONE` while there is none)."""
        self.skips = 0
        self.in_a_row = 0

    @property
    def _scaled(self) -> bool:
        """fp16 with a loss scaler: overflowing gradients are the scaler's business (it skips the step and
        lowers the scale), so only the loss counts."""
        return getattr(self.accelerator, "scaler", None) is not None

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | float) -> torch.Tensor:
        """Record on the device whether `step` was finite (no read-back); returns that as a bool tensor.

        A grad norm that is not a tensor (DeepSpeed clips inside its engine and reports none) is not looked at.
        """
        finite = torch.isfinite(loss.detach()).all()
        if isinstance(grad_norm, torch.Tensor) and not self._scaled:
            finite = finite & torch.isfinite(grad_norm.detach().to(finite.device)).all()
        if self.first_bad is None:
            self.first_bad = torch.full((), NONE, dtype=torch.int64, device=finite.device)
        self.first_bad = torch.where(finite, self.first_bad, self.first_bad.clamp(max=step))
        return finite

    # ------------------------------------------------------------------ "skip"
    def skip(self, step: int, finite: torch.Tensor) -> bool:
        """In "skip" mode: whether `step` must leave the weights alone (one read-back, the same answer on every
        process). Under fp16 the loss scaler is told about a skipped step; the caller then steps neither the
        optimizer nor the learning-rate schedule, and drops the gradients. Raises `RunStopped` after
        `max_skips` skipped steps in a row. Always False in "stop" mode (nothing is read back)."""
        if self.mode != "skip":
            return False
        bad = self.accelerator.gather((~finite).to(torch.int32).reshape(1))
        if not bool(bad.any()):
            self.in_a_row = 0
            return False
        self.skips += 1
        self.in_a_row += 1
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:  # `clip_grad_norm_` unscaled the gradients; the scaler expects an update next
            scaler.update()
        if self.in_a_row >= self.max_skips:
            first = step - self.in_a_row + 1
            raise RunStopped(
                f"steps {first}–{step}: {self.in_a_row} non-finite steps in a row (NaN or inf loss or gradient "
                f"norm; train.max_nonfinite_skips = {self.max_skips}). {self._advice(first)}",
                EXIT_STATUS,
            )
        return True

    def metrics(self) -> dict[str, int]:
        """Extra metrics.jsonl entries: in "skip" mode, `nonfinite_skips` (steps skipped since the run started)."""
        return {"nonfinite_skips": self.skips} if self.mode == "skip" else {}

    # ------------------------------------------------------------------ "stop"
    def pending(self, weights: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
        """Scalar device tensors for the caller to read back with its own numbers and pass to `verdict`:
        the first bad step over all processes and, with `weights`, whether any is not finite. Empty in "skip"
        mode (skipped steps never reach the weights) unless `weights` are given."""
        values = []
        if self.mode == "stop" and self.first_bad is not None:
            values.append(self.accelerator.gather(self.first_bad.reshape(1)).min())
        if weights:
            device = self.accelerator.device
            finite = torch.stack([torch.isfinite(_local(w).detach()).all().to(device) for w in weights]).all()
            values.append(self.accelerator.gather((~finite).to(torch.int64).reshape(1)).max())
        return values

    def verdict(self, step: int, numbers: Sequence[float], weights: bool = False) -> None:
        """Raise `RunStopped` if `numbers` (what `pending` returned, read back) show a non-finite step or, with
        `weights`, non-finite weights; `step` is the step just taken."""
        numbers = list(numbers)
        first_bad = int(numbers.pop(0)) if self.mode == "stop" and self.first_bad is not None else NONE
        bad_weights = bool(numbers.pop(0)) if weights else False
        if first_bad < NONE:
            raise RunStopped(
                f"step {first_bad}: the loss or gradient norm is not finite (NaN or inf); the run stopped at step "
                f"{step} without writing weights from it. {self._advice(first_bad)}",
                EXIT_STATUS,
            )
        if bad_weights:
            raise RunStopped(
                f"step {step}: the trainable weights are not finite (NaN or inf) although every loss and gradient "
                f"norm was: an update overflowed; nothing was written from it. {self._advice(step)}",
                EXIT_STATUS,
            )

    def check(self, step: int, weights: Sequence[torch.Tensor] = ()) -> None:
        """`pending` + `verdict` in one read-back: before a checkpoint or the export (pass the trainable
        weights)."""
        values = self.pending(weights)
        if not values:
            return
        device = values[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.verdict(step, torch.stack([v.to(dtype) for v in values]).tolist(), weights=bool(weights))

    def _advice(self, first_bad: int) -> str:
        """Where to go on from: the newest checkpoint before `first_bad`, and what to change (resuming
        unchanged repeats the same steps bit for bit)."""
        good = [(step, path) for step, path in complete_checkpoints(self.output_dir) if step < first_bad]
        lower = f"a lower train.learning_rate (now {self.learning_rate:g})"
        if not good:
            return f"No checkpoint was written before it: start again with {lower}."
        step, path = good[-1]
        resume = f"resume with `--resume {path}"
        if self.mode == "stop":
            resume += " --set train.on_nonfinite=skip` (skips such steps) or"
        else:
            resume += "` and"
        return (
            f"The last good checkpoint is {path} (step {step}). Resuming it unchanged repeats the same steps: "
            f"{resume} a smaller train.max_grad_norm, or start a new run with {lower}."
        )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's own shard (FSDP2 DTensor) or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor
