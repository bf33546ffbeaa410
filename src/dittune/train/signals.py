"""Stopping a run cleanly on SIGINT (Ctrl-C), SIGTERM (spot reclaim, `kill`, torchrun) and SIGHUP.

The first signal asks the loop to stop after the current step; the trainer then writes a checkpoint, says how to
resume and exits with 128 + the signal number. A second signal exits at once (as Ctrl-C always did): nothing is
corrupted, since checkpoints and cache entries are written to temporary names and renamed into place. With several
processes every one stops after the same step: the request is shared with an all-reduce after each step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopOnSignal:
    """Within `with StopOnSignal() as stop:` the handled signals set `stop.signal` instead of ending the process."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for number in HANDLED:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt  # the second signal: leave now (temporary files are never taken as complete)
        self.signal = number
        name = signal.Signals(number).name
        print(f"\n{name}: finishing this step, then writing a checkpoint ({name} again quits at once)", flush=True)

    def requested(self, accelerator: Any) -> int | None:
        """The signal every process agrees to stop on after this step (the highest one asked), or None."""
        asked = self.signal or 0
        if accelerator.num_processes > 1:
            flag = torch.tensor([asked], device=accelerator.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            asked = int(flag.item())
        return asked or None

    @staticmethod
    def name(number: int) -> str:
        return signal.Signals(number).name
