"""An optimizer whose state lives on the CPU (`train.optimizer_offload`).

The wrapped optimizer is built over fp32 copies of the trainable parameters on the CPU ("masters"). Each
step copies the gradients to the CPU, steps there and copies the new weights back. On CUDA the copies go
through pinned memory without blocking the host; on a CPU-only machine it is a plain (degenerate) copy.

To the outside it looks like the wrapped optimizer: `param_groups` are views of the wrapped optimizer's
groups whose "params" are the training parameters (so LR schedules, gradient scaling and clipping see the
real ones), and `state_dict()` is the wrapped optimizer's, which is loadable with or without offloading.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

import torch


class _Group(MutableMapping):
    """A param group of the wrapped optimizer, with "params" replaced by the training parameters."""

    def __init__(self, inner: dict[str, Any], params: list[torch.Tensor]) -> None:
        self._inner, self._params = inner, params

    def __getitem__(self, key: str) -> Any:
        return self._params if key == "params" else self._inner[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "params":
            raise TypeError("an offloaded optimizer's parameters are fixed")
        self._inner[key] = value

    def __delitem__(self, key: str) -> None:
        del self._inner[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._inner)

    def __len__(self) -> int:
        return len(self._inner)


class OffloadOptimizer(torch.optim.Optimizer):
    """`build(masters)` makes the wrapped optimizer over CPU copies of `params` (a flat list).

    The copies are refreshed from the parameters before the first step and after `load_state_dict`, so
    weights loaded into the model after the optimizer (accelerate's `load_state`) are picked up.
    Subclassing `Optimizer` (without its `__init__`) lets LR schedulers accept it.
    """

    def __init__(self, params: Iterable[torch.Tensor], build: Callable[[list[torch.Tensor]], Any]) -> None:
        self.params = list(params)
        if not self.params or not all(isinstance(p, torch.Tensor) for p in self.params):
            raise ValueError("OffloadOptimizer takes a non-empty flat list of parameters")
        pin = torch.cuda.is_available() and any(p.device.type == "cuda" for p in self.params)
        self.masters = [torch.empty(p.shape, dtype=torch.float32, pin_memory=pin) for p in self.params]
        self._grads = [torch.empty_like(m, pin_memory=pin) for m in self.masters]
        self.optimizer = build(self.masters)
        self._param_of = {id(m): p for m, p in zip(self.masters, self.params)}
        self._groups: list[_Group] = []
        self._stale = True
        self._pending: set[torch.device] = set()

    # -- what schedulers, accelerate and checkpoints use
    @property
    def param_groups(self) -> list[_Group]:  # type: ignore[override]
        inner = self.optimizer.param_groups  # new dicts after load_state_dict: views follow
        if len(inner) != len(self._groups) or any(v._inner is not g for v, g in zip(self._groups, inner)):
            self._groups = [_Group(g, [self._param_of[id(m)] for m in g["params"]]) for g in inner]
        return self._groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def state_dict(self) -> dict[str, Any]:
        self._wait()
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._wait()
        self.optimizer.load_state_dict(state_dict)  # state tensors land on the masters' device: the CPU
        self._stale = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.detach_().zero_()

    def offload_buffers(self) -> list[torch.Tensor]:
        """The CPU copies of the weights and the gradient buffers (counted by `optim.state_bytes`)."""
        return self.masters + self._grads

    # -- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._refresh()
        for param, master, buffer in zip(self.params, self.masters, self._grads):
            if param.grad is None:
                master.grad = None
                continue
            buffer.copy_(param.grad, non_blocking=param.is_cuda)
            master.grad = buffer
            self._note(param)
        self._wait()  # the gradients are on the CPU
        self.optimizer.step()
        self._push()
        return loss

    # -- schedule-free optimizers: switch the CPU copies, then the parameters
    def train(self) -> None:
        self._switch("train")

    def eval(self) -> None:
        self._switch("eval")

    def _switch(self, mode: str) -> None:
        method = getattr(self.optimizer, mode, None)
        if callable(method):
            self._refresh()
            self._wait()
            method()
            self._push()

    # -- copies
    @torch.no_grad()
    def _refresh(self) -> None:
        """Masters ← parameters, when they may differ (before the first step, after loading a state)."""
        if not self._stale:
            return
        self._wait()
        for param, master in zip(self.params, self.masters):
            master.copy_(param.detach(), non_blocking=param.is_cuda)
            self._note(param)
        self._wait()
        self._stale = False

    @torch.no_grad()
    def _push(self) -> None:
        """Parameters ← masters. Asynchronous on CUDA: later kernels on the stream see the new weights; the host
        waits (`_wait`) before it writes the masters again."""
        for param, master in zip(self.params, self.masters):
            param.copy_(master, non_blocking=param.is_cuda)
            self._note(param)

    def _note(self, param: torch.Tensor) -> None:
        if param.is_cuda:
            self._pending.add(param.device)

    def _wait(self) -> None:
        for device in self._pending:
            torch.cuda.current_stream(device).synchronize()
        self._pending.clear()
