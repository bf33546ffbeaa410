"""Activation checkpointing for a list of transformer blocks, without touching model code.

Each block gets an instance-level ``forward`` that routes through
``torch.utils.checkpoint.checkpoint`` (non-reentrant) while training with grad enabled.
Nothing is wrapped or renamed, so ``state_dict`` keys, peft-injected LoRA layers and
hooks registered on the block or its children are unaffected. A ``forward`` that was
already set on the instance (e.g. by accelerate hooks) is kept as the inner call and
restored by `disable_block_checkpointing`.

`checkpointed_count` turns `train.gradient_checkpointing_ratio` into a number of blocks; the spec checkpoints
that many of its first blocks (`ModelSpec.enable_partial_checkpointing`). `SavedActivations` measures what that
saves: the bytes autograd keeps for backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint


class _CheckpointedForward:
    """Callable stored as ``block.forward``; checkpoints the block's original forward when training."""

    __slots__ = ("block", "previous")

    def __init__(self, block: nn.Module, previous: Callable[..., Any] | None) -> None:
        self.block = block
        self.previous = previous  # instance-level forward that existed before, if any

    def _inner(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if self.previous is not None:
            return self.previous, ()
        return type(self.block).forward, (self.block,)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn, lead = self._inner()
        if torch.is_grad_enabled() and self.block.training:
            return checkpoint(fn, *lead, *args, use_reentrant=False, **kwargs)
        return fn(*lead, *args, **kwargs)


def _installed(block: nn.Module) -> _CheckpointedForward | None:
    fwd = block.__dict__.get("forward")
    return fwd if isinstance(fwd, _CheckpointedForward) else None


def is_checkpointing(block: nn.Module) -> bool:
    """Whether `enable_block_checkpointing` is active on ``block``."""
    return _installed(block) is not None


def enable_block_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Checkpoint each block's forward during training; idempotent."""
    for block in blocks:
        if not is_checkpointing(block):
            block.forward = _CheckpointedForward(block, block.__dict__.get("forward"))


def disable_block_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Undo `enable_block_checkpointing`, restoring any earlier instance-level forward."""
    for block in blocks:
        installed = _installed(block)
        if installed is None:
            continue
        if installed.previous is not None:
            block.forward = installed.previous
        else:
            del block.__dict__["forward"]


def checkpointed_count(ratio: float, total: int) -> int:
    """How many of ``total`` blocks a checkpointing ratio in (0, 1] covers: ceil(ratio · total), at least one."""
    if not 0 < ratio <= 1:
        raise ValueError(f"a checkpointing ratio must be in (0, 1], not {ratio}")
    # rounded first, so that float noise (0.3 · 10 = 3.0000000000000004) does not add a block
    return min(total, max(1, math.ceil(round(ratio * total, 9))))


class SavedActivations:
    """Bytes kept for backward by the forward passes run inside the ``with`` block: every tensor storage autograd
    saves, each counted once, without ``model``'s own parameters and buffers (alive anyway). Every input of a
    checkpointed block in ``blocks`` is counted too: the checkpoint keeps it for the recomputation, though only
    top-level positional tensors pass through autograd's saved-tensor hooks. A block counts as checkpointed by
    `enable_block_checkpointing` or by diffusers' switch (``model.gradient_checkpointing``).

    Deterministic (unlike an allocator reading), so tests can compare it exactly. Run the backward after the
    ``with`` block; the count is then in `bytes`.
    """

    def __init__(self, model: nn.Module, blocks: Iterable[nn.Module] = ()) -> None:
        self.model = model
        self.blocks = list(blocks)
        self.storages: dict[int, int] = {}  # data pointer → bytes
        self._skip: set[int] = set()
        self._context: Any = None
        self._handles: list[Any] = []

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def _add(self, tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer and pointer not in self._skip:
            self.storages[pointer] = storage.nbytes()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._add(tensor)
        return tensor

    def _block_inputs(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        checkpointed = is_checkpointing(block) or getattr(self.model, "gradient_checkpointing", False) is True
        if checkpointed and block.training and torch.is_grad_enabled():
            for leaf in tree_leaves((args, kwargs)):
                self._add(leaf)

    def __enter__(self) -> SavedActivations:
        tensors = chain(self.model.parameters(), self.model.buffers())
        self._skip = {t.untyped_storage().data_ptr() for t in tensors}
        self._handles = [b.register_forward_pre_hook(self._block_inputs, with_kwargs=True) for b in self.blocks]
        self._context = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._context.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._context.__exit__(kind, error, traceback)
        for handle in self._handles:
            handle.remove()
