"""Block offloading for LoRA (`train.blocks_to_swap`): the frozen weights of the first K transformer blocks live
on a storage device (the CPU) and are copied to the training device block by block, just before the block runs.

Which modules are "the transformer blocks" is the spec's declaration (`ModelSpec.transformer_blocks`), so nothing
here knows a family. Only frozen parameters move; trainable ones (LoRA's A and B, inside the same blocks) and
buffers stay on the device, so the optimizer's parameters and every parameter's identity are unchanged. A copy
on the device is made per use and dropped afterwards: frozen weights never change, so nothing is copied back.

**Backward.** Autograd keeps tensors for backward that may be these weights (a frozen parameter itself, e.g. for
``x * scale``, or a view of it, e.g. for a Linear). Swapped blocks are therefore always recomputed in backward
(activation checkpointing, non-reentrant): their forward keeps no weight, and the recomputation runs the block's
forward again, which brings its weights in again. Blocks that the run's own checkpointing (diffusers' switch or
dittune's) does not cover get dittune's `enable_block_checkpointing`. A recomputed block's weights stay on the
device until the backward moves on to the previous swapped block (autograd runs every node of a block before
any node of an earlier one, as it orders ready nodes by creation) or until the backward ends.

**Order.** Blocks run in call order in the forward and in reverse in backward. Entering block i fetches it (if
not fetched yet), releases every other copy but the next block's, and prefetches the next swapped block in the
direction of travel: on a CUDA device on a side stream from pinned memory, overlapping the copy with block i's
compute; elsewhere synchronously. The last swapped block stays on the device after a training forward, since
the backward starts with it. So at most two swapped blocks (the running one and the next) are on the device.

**Placement.** `denoiser.to(...)` (also accelerate's ``prepare``) leaves the swapped weights where they are:
each swapped block's ``_apply`` skips them. The wrapper sits under the checkpoint and above a compiled forward
(`train.compile`): call `offload_blocks` after both, as `build_run` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dittune.models.checkpointing import disable_block_checkpointing, enable_block_checkpointing, is_checkpointing

if TYPE_CHECKING:
    from dittune.models.base import ModelSpec

_REPORT = "_dittune_block_offload"
Observer = Callable[[str, int], None]
"""Called with (event, block index) for "fetch", "forward", "recompute" and "release" (tests, benchmarks)."""


@dataclass
class _Copy:
    """A swapped block's weights on the device, and the event that ends their copy on the side stream."""

    tensors: list[torch.Tensor]
    event: Any = None
    side: bool = False


class _OffloadedForward:
    """Callable stored as ``block.forward``: brings the block's weights in around its original forward."""

    __slots__ = ("block", "index", "offload", "previous")

    def __init__(self, offload: BlockOffload, index: int, previous: Callable[..., Any] | None) -> None:
        self.offload = offload
        self.index = index
        self.block = offload.blocks[index]
        self.previous = previous  # instance-level forward that existed before (e.g. a compiled one), if any

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.offload.enter(self.index)
        try:
            if self.previous is not None:
                return self.previous(*args, **kwargs)
            return type(self.block).forward(self.block, *args, **kwargs)
        finally:
            self.offload.leave(self.index)


class _ApplyKeepingStored:
    """Callable stored as ``block._apply``: `nn.Module.to` and friends skip the swapped weights."""

    __slots__ = ("block", "stored")

    def __init__(self, block: nn.Module, stored: set[int]) -> None:
        self.block = block
        self.stored = stored  # ids of the swapped parameters

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        hidden = [
            (module, name, param)
            for module in self.block.modules()
            for name, param in module._parameters.items()
            if param is not None and id(param) in self.stored
        ]
        for module, name, _ in hidden:
            module._parameters[name] = None
        try:
            return type(self.block)._apply(self.block, fn, recurse)
        finally:
            for module, name, param in hidden:
                module._parameters[name] = param


def _in_backward() -> bool:
    """Whether this runs inside an autograd backward (a checkpoint's recomputation)."""
    return torch._C._current_graph_task_id() != -1


class BlockOffload:
    """The frozen weights of ``blocks[:count]`` on ``storage``, copied to ``device`` per block (see the module).

    ``prefetch``: copy the next swapped block while the current one runs (asynchronous on CUDA). ``pin_memory``
    (default: when ``device`` is CUDA) pins the stored weights, which CUDA needs to copy them asynchronously.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        count: int,
        *,
        device: torch.device | str,
        storage: torch.device | str = "cpu",
        prefetch: bool = True,
        pin_memory: bool | None = None,
    ) -> None:
        if not 0 < count <= len(blocks):
            raise ValueError(f"cannot swap {count} of {len(blocks)} transformer blocks")
        self.blocks = list(blocks)
        self.count = count
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.storage = torch.device(storage)
        self.prefetch = prefetch
        self.pinned = self.device.type == "cuda" and self.storage.type == "cpu" if pin_memory is None else pin_memory
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if prefetch and cuda else None
        self.params: list[list[tuple[nn.Parameter, torch.Tensor]]] = [self._store(b) for b in self.blocks[:count]]
        self.copies: dict[int, _Copy] = {}
        self.observer: Observer | None = None
        self.fetches = 0
        self.peak_resident = 0
        self._queued_for = -1  # graph task whose end releases every copy

    def _store(self, block: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, its data on the storage device) for every frozen parameter of ``block``; moves them there."""
        stored = []
        for param in dict.fromkeys(p for p in block.parameters() if not p.requires_grad):
            home = param.data.to(self.storage)
            if self.pinned and not home.is_pinned():
                home = home.pin_memory()
            param.data = home
            stored.append((param, home))
        return stored

    # ------------------------------------------------------------------------------------------ facts
    @property
    def resident(self) -> set[int]:
        """Swapped blocks whose weights are on the device now."""
        return set(self.copies)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the swapped weights (kept on the storage device)."""
        return sum(home.numel() * home.element_size() for params in self.params for _, home in params)

    def line(self) -> str:
        """One line for the start-up summary."""
        size = self.stored_bytes
        text = f"{size / 2**20:.2f} MiB" if size < 2**30 else f"{size / 2**30:.2f} GiB"
        how = "prefetching the next on a side stream" if self.stream is not None else "one at a time"
        if self.prefetch and self.stream is None:
            how = "prefetching the next (synchronous copies)"
        line = (
            f"{self.count} of {len(self.blocks)} blocks' frozen weights ({text}) on {self.storage}, copied to "
            f"{self.device} per block, {how}; recomputed in backward"
        )
        if self.device.type == self.storage.type == "cpu":
            line += " (both are the CPU here: copies only, no memory saved)"
        return line

    # ------------------------------------------------------------------------------------------ moves
    def _notify(self, event: str, index: int) -> None:
        if self.observer is not None:
            self.observer(event, index)

    def _fetch(self, index: int, asynchronous: bool) -> None:
        if index in self.copies:
            return
        homes = [home for _, home in self.params[index]]
        side = asynchronous and self.stream is not None
        if side:
            with torch.cuda.stream(self.stream):
                tensors = [torch.empty_like(h, device=self.device).copy_(h, non_blocking=True) for h in homes]
                copy = _Copy(tensors, self.stream.record_event(), side=True)
        else:
            copy = _Copy([torch.empty_like(h, device=self.device).copy_(h, non_blocking=self.pinned) for h in homes])
        self.copies[index] = copy
        self.fetches += 1
        self.peak_resident = max(self.peak_resident, len(self.copies))
        self._notify("fetch", index)

    def _use(self, index: int) -> None:
        copy = self.copies[index]
        if copy.side:  # the compute stream waits for the copy; the allocator for the compute stream's use
            stream = torch.cuda.current_stream(self.device)
            if copy.event is not None:
                stream.wait_event(copy.event)
                copy.event = None
            for tensor in copy.tensors:
                tensor.record_stream(stream)
        for (param, _), tensor in zip(self.params[index], copy.tensors):
            param.data = tensor

    def _release(self, index: int) -> None:
        if self.copies.pop(index, None) is None:
            return
        for param, home in self.params[index]:
            param.data = home
        self._notify("release", index)

    def release_all(self) -> None:
        """Point every swapped weight back at its stored copy (dropping the device copies)."""
        for index in sorted(self.copies):
            self._release(index)

    def _after_backward(self) -> None:
        self._queued_for = -1
        self.release_all()

    # ------------------------------------------------------------------------------------------ hooks
    def enter(self, index: int) -> None:
        """Before block ``index`` runs: its weights on the device, the next block's on their way."""
        backward = _in_backward()
        if torch.is_grad_enabled() and not backward:
            self._check_recomputed(index)
        following = index - 1 if backward else index + 1
        following = following if self.prefetch and 0 <= following < self.count else None
        for other in list(self.copies):
            if other not in (index, following):
                self._release(other)
        self._fetch(index, asynchronous=False)
        if following is not None:
            self._fetch(following, asynchronous=True)
        self._use(index)
        if backward:
            graph_task = torch._C._current_graph_task_id()
            if self._queued_for != graph_task:
                torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)
                self._queued_for = graph_task
        self._notify("recompute" if backward else "forward", index)

    def _check_recomputed(self, index: int) -> None:
        """A forward with autograd on must run inside a checkpoint (whose saved-tensor hooks keep no weight)."""
        if not self.blocks[index].training:
            raise RuntimeError(
                "blocks_to_swap: a swapped block ran with autograd on in eval mode, where it is not recomputed in "
                "backward; call .train() for training or run under torch.no_grad()"
            )
        if torch._C._autograd._top_saved_tensors_default_hooks(False) is None:
            raise RuntimeError(
                f"blocks_to_swap: swapped block {index} ran with autograd on outside a checkpoint, so autograd "
                "would keep its weights on the device; it must be recomputed in backward (see offload_blocks)"
            )

    def leave(self, index: int) -> None:
        """After block ``index`` ran: release its weights, unless a backward still needs them."""
        if _in_backward():
            return  # autograd may hold the weights themselves: released when the backward moves on, or ends
        if torch.is_grad_enabled() and index == self.count - 1:
            return  # the backward recomputes this block first
        self._release(index)


def offload_blocks(
    spec: ModelSpec,
    denoiser: nn.Module,
    count: int,
    *,
    device: torch.device | str,
    storage: torch.device | str = "cpu",
    prefetch: bool = True,
    pin_memory: bool | None = None,
) -> BlockOffload:
    """Swap the frozen weights of the first ``count`` of ``spec.transformer_blocks(denoiser)`` (see the module).

    Call it after LoRA injection, `model.base_storage`, checkpointing and `train.compile`, before moving the
    denoiser to ``device``. The swapped blocks are recomputed in backward (dittune's block checkpointing where
    the model's own switch is off). The result is also kept on the denoiser (`applied_offload`).
    """
    blocks = spec.transformer_blocks(denoiser)
    if count > len(blocks):
        raise ValueError(
            f"train.blocks_to_swap = {count}, but {type(denoiser).__name__} has only {len(blocks)} transformer "
            f"blocks ({', '.join(spec.block_lists)}); use at most {len(blocks)}"
        )
    if applied_offload(denoiser) is not None:
        raise ValueError("the denoiser's blocks are swapped already")
    offload = BlockOffload(blocks, count, device=device, storage=storage, prefetch=prefetch, pin_memory=pin_memory)
    switch = getattr(denoiser, "gradient_checkpointing", False) is True  # diffusers': checkpoints block.__call__
    for index, block in enumerate(blocks[:count]):
        checkpointed = is_checkpointing(block)
        if checkpointed:  # re-enabled below, so that the checkpoint wraps the offloaded forward
            disable_block_checkpointing([block])
        block.forward = _OffloadedForward(offload, index, block.__dict__.get("forward"))
        if checkpointed or not switch:
            enable_block_checkpointing([block])
        block._apply = _ApplyKeepingStored(block, {id(param) for param, _ in offload.params[index]})
    # DDP would broadcast (and check the device of) every parameter at wrap time; the swapped ones are frozen
    # and loaded identically by every process.
    stored = {id(param) for params in offload.params for param, _ in params}
    names = [name for name, param in denoiser.named_parameters() if id(param) in stored]
    denoiser._ddp_params_and_buffers_to_ignore = [*getattr(denoiser, "_ddp_params_and_buffers_to_ignore", ()), *names]
    object.__setattr__(denoiser, _REPORT, offload)
    return offload


def applied_offload(denoiser: nn.Module) -> BlockOffload | None:
    """The `BlockOffload` of `offload_blocks` on this denoiser (None: no blocks swapped)."""
    return getattr(denoiser, _REPORT, None)
