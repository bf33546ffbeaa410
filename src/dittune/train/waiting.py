"""Processes that wait for the main process's side work (validation) on their own, long timeout.

Only the main process validates; the others stop at a barrier until it is done. A barrier on the training
process group would time out after that group's timeout (torch's default: 10 min on NCCL, 30 min on gloo) —
shorter than a video validation can take. `SideWorkWait` waits on a separate gloo group created with
`validation.timeout_minutes`, so training collectives keep their own timeout and a long validation does not
end the run. The main process never raises out of its side work (errors are recorded), so the barrier is
always reached and a failed validation cannot leave the others waiting.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any


class SideWorkWait:
    """A barrier between every process with its own timeout; a no-op for a single process."""

    def __init__(self, processes: int, timeout_minutes: float) -> None:
        self.processes = processes
        self.timeout = timedelta(minutes=timeout_minutes)
        self._group: Any = None
        if processes > 1:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo", timeout=self.timeout)  # every process, collectively

    def __call__(self) -> None:
        """Wait until every process arrives (at most the timeout; then torch raises on the waiting ones)."""
        if self._group is not None:
            import torch.distributed as dist

            dist.barrier(group=self._group)
