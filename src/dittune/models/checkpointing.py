"""Activation checkpointing for a list of transformer blocks, without touching model code.

Each block gets an instance-level ``forward`` that routes through
``torch.utils.checkpoint.checkpoint`` (non-reentrant) while training with grad enabled.
Nothing is wrapped or renamed, so ``state_dict`` keys, peft-injected LoRA layers and
hooks registered on the block or its children are unaffected. A ``forward`` that was
already set on the instance (e.g. by accelerate hooks) is kept as the inner call and
restored by `disable_block_checkpointing`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
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
