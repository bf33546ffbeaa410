"""Count the bytes of live tensor storages, by label, and their peak: the meter behind `dittune estimate`.

`LiveTensors` is a `TorchDispatchMode`: every storage an aten op returns while it is active is counted (once,
however many views share it) until Python's last reference to that storage dies (a weakref finalizer). Tensors
that existed before — a model's weights, an optimizer's state — join with `add`, under a label ("VAE",
"gradients", …); op outputs are labelled "activations" (everything a step computes: inputs, activations saved
for backward, temporaries) unless `relabel` moves them (a parameter's gradient). The peak is the largest total
seen after any op, with the breakdown by label at that moment. Labels in `host` are followed but not added to
the total (an optimizer state kept on the CPU while the estimate is of the GPU).

It works the same on real tensors (a measured run) and on fake ones (`FakeTensorMode`, no data: the estimate),
which is what lets the estimate be checked against a run. It counts tensor bytes only: not the allocator's
rounding or caching, the CUDA context, workspaces inside fused kernels, or tensors made without an aten op
(e.g. read from a file) unless they are added. Dispatch modes are per thread: work on other threads (data
loading) is not seen. Meta tensors (no memory) are ignored.

`trace` runs one stage of a phase under a fresh meter and returns a `Stage`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ACTIVATIONS = "activations"
GRADIENTS = "gradients"
T = TypeVar("T")


class _Entry:
    __slots__ = ("label", "nbytes")

    def __init__(self, label: str, nbytes: int) -> None:
        self.label = label
        self.nbytes = nbytes


class LiveTensors(TorchDispatchMode):
    """Live tensor bytes by label while active (see the module docstring); `peak` and `at_peak` after."""

    def __init__(self, host: Iterable[str] = ()) -> None:
        super().__init__()
        self.host = frozenset(host)
        self._entries: dict[int, tuple[weakref.ref, _Entry]] = {}
        self.totals: dict[str, int] = {}
        self.current = 0
        self.peak = 0
        self.at_peak: dict[str, int] = {}

    def _change(self, label: str, nbytes: int) -> None:
        self.totals[label] = self.totals.get(label, 0) + nbytes
        if label not in self.host:
            self.current += nbytes

    def _entry(self, tensor: torch.Tensor, label: str) -> tuple[_Entry | None, bool]:
        """The entry of `tensor`'s storage (None for one without memory) and whether it is new."""
        if tensor.device.type == "meta":
            return None, False
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensors without a storage of their own
            return None, False
        key = id(storage)
        known = self._entries.get(key)
        if known is not None and known[0]() is storage:
            return known[1], False
        entry = _Entry(label, storage.nbytes())
        self._entries[key] = (weakref.ref(storage, lambda _, key=key, entry=entry: self._free(key, entry)), entry)
        self._change(label, entry.nbytes)
        return entry, True

    def _free(self, key: int, entry: _Entry) -> None:
        known = self._entries.get(key)
        if known is not None and known[1] is entry:
            del self._entries[key]
        self._change(entry.label, -entry.nbytes)

    def _check_peak(self) -> None:
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = {label: size for label, size in self.totals.items() if size and label not in self.host}

    def add(self, tensors: Iterable[torch.Tensor], label: str) -> None:
        """Count existing tensors under `label` (ones already counted keep their label)."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._entry(tensor, label)
        self._check_peak()

    def relabel(self, tensors: Iterable[torch.Tensor], label: str) -> None:
        """Move tensors' bytes to `label` (counting them if new)."""
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor):
                continue
            entry, new = self._entry(tensor, label)
            if entry is not None and not new and entry.label != label:
                self._change(entry.label, -entry.nbytes)
                self._change(label, entry.nbytes)
                entry.label = label
        self._check_peak()

    def live(self) -> dict[str, int]:
        """Bytes by label now (host labels included)."""
        return {label: size for label, size in self.totals.items() if size}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._entry(value, ACTIVATIONS)
        self._check_peak()
        return out


@dataclass
class Stage:
    """The peak of one stage of a phase (e.g. "VAE encode" of the caching phase) and its breakdown."""

    name: str
    peak: int
    at_peak: dict[str, int]
    detail: str = ""
    host: dict[str, int] = field(default_factory=dict)
    """Bytes kept off the device (labels in `LiveTensors.host`) at the end of the stage."""


def trace(
    name: str,
    run: Callable[[], T],
    resident: Mapping[str, Iterable[torch.Tensor]],
    *,
    gradients_of: Iterable[torch.Tensor] = (),
    host: Iterable[str] = (),
    detail: str = "",
) -> tuple[Stage, T]:
    """Run `run()` under a fresh meter that starts with `resident` (label → tensors); the gradients that
    autograd accumulates into `gradients_of` are counted as "gradients"."""
    meter = LiveTensors(host)
    hooks = [
        param.register_post_accumulate_grad_hook(lambda p: meter.relabel([p.grad], GRADIENTS))
        for param in gradients_of
        if param.requires_grad
    ]
    host_peak: dict[str, int] = {}
    try:
        with meter:
            for label, tensors in resident.items():
                meter.add(tensors, label)
            result = run()
            host_peak = {label: size for label, size in meter.live().items() if label in meter.host}
    finally:
        for hook in hooks:
            hook.remove()
    return Stage(name, meter.peak, meter.at_peak, detail, host_peak), result


# ---------------------------------------------------------------------------------- helpers
def module_tensors(modules: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    """Parameters and buffers of `modules`."""
    return [t for module in modules for t in (*module.parameters(), *module.buffers())]


def modules_in(obj: Any, depth: int = 2) -> list[torch.nn.Module]:
    """The top-level `nn.Module`s held by `obj` (itself, or in its attributes, lists, tuples and dicts)."""
    found: list[torch.nn.Module] = []

    def visit(value: Any, level: int) -> None:
        if isinstance(value, torch.nn.Module):
            if all(value is not seen for seen in found):
                found.append(value)
            return
        if level >= depth or isinstance(value, str | bytes | type):
            return
        if isinstance(value, dict):
            children: Iterable[Any] = value.values()
        elif isinstance(value, list | tuple):
            children = value
        else:
            children = vars(value).values() if hasattr(value, "__dict__") else ()
        for child in children:
            visit(child, level + 1)

    visit(obj, 0)
    return found


def storage_bytes(tensors: Iterable[torch.Tensor]) -> dict[str, int]:
    """Bytes by dtype name of the distinct storages of `tensors` (tied weights count once)."""
    seen: set[int] = set()
    totals: dict[str, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if id(storage) in seen:
            continue
        seen.add(id(storage))
        name = str(tensor.dtype).removeprefix("torch.")
        totals[name] = totals.get(name, 0) + storage.nbytes()
    return totals
