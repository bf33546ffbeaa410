"""Regional `torch.compile` (`train.compile`): each transformer block compiled on its own, not the whole model.

Which modules are "the transformer blocks" is the spec's declaration (`ModelSpec.block_lists`), so nothing
here knows a family. Blocks of one class share their compiled code (dynamo caches per code object and passes
parameters as graph inputs), so compile time is that of one or two graphs per block kind, not per block.

Each block gets an instance-level ``forward`` that calls the compiled forward while training with grad enabled,
and the eager one otherwise: validation and sampling run the same weights eagerly, without compiling again for
no-grad, eval mode or guidance batches. Nothing is wrapped or renamed, so ``state_dict`` keys (no
``_orig_mod.``), peft-injected LoRA layers, hooks, checkpoints and exports are unaffected. It composes with
both kinds of gradient checkpointing in either order, with the checkpoint *outside* the compiled region:
diffusers' switch checkpoints ``block.__call__``, and `dittune.models.checkpointing` keeps an instance-level
``forward`` as its inner call (diffusers marks its blocks `allow_in_graph`, so dynamo cannot trace a
checkpoint placed inside the compiled region anyway).

The first steps are slow: every block kind is compiled once for the first batch shape and once more, with
a dynamic shape, when a second bucket shape arrives. See benchmarks/README.md for when it pays.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dittune.models.checkpointing import disable_block_checkpointing, enable_block_checkpointing, is_checkpointing

if TYPE_CHECKING:
    from dittune.models.base import ModelSpec


class _CompiledForward:
    """Callable stored as ``block.forward``: the compiled forward when training with grad, else the eager one."""

    __slots__ = ("block", "compiled", "eager", "previous")

    def __init__(self, block: nn.Module, previous: Callable[..., Any] | None, **options: Any) -> None:
        self.block = block
        self.previous = previous  # instance-level forward that existed before, if any
        self.eager = previous if previous is not None else block.forward
        self.compiled = torch.compile(self.eager, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and self.block.training:
            return self.compiled(*args, **kwargs)
        return self.eager(*args, **kwargs)


def _installed(block: nn.Module) -> _CompiledForward | None:
    """The block's compiled forward, also when a checkpointing wrapper sits on top of it."""
    forward = block.__dict__.get("forward")
    while forward is not None and not isinstance(forward, _CompiledForward):
        forward = getattr(forward, "previous", None)  # checkpointing.py's wrapper keeps the inner call here
    return forward


def is_compiled(block: nn.Module) -> bool:
    """Whether `compile_modules` is active on ``block``."""
    return _installed(block) is not None


def compile_modules(blocks: Iterable[nn.Module], **options: Any) -> int:
    """Compile each module's forward in place (``options`` go to `torch.compile`); idempotent.

    Returns how many modules were newly compiled.
    """
    count = 0
    for block in blocks:
        if is_compiled(block):
            continue
        checkpointed = is_checkpointing(block)
        if checkpointed:  # re-enabled below, so that the checkpoint wraps the compiled forward
            disable_block_checkpointing([block])
        block.forward = _CompiledForward(block, block.__dict__.get("forward"), **options)
        if checkpointed:
            enable_block_checkpointing([block])
        count += 1
    return count


def uncompile_modules(blocks: Iterable[nn.Module]) -> None:
    """Undo `compile_modules`, keeping any checkpointing."""
    for block in blocks:
        installed = _installed(block)
        if installed is None:
            continue
        checkpointed = is_checkpointing(block)
        if checkpointed:
            disable_block_checkpointing([block])
        if installed.previous is not None:
            block.forward = installed.previous
        else:
            del block.__dict__["forward"]
        if checkpointed:
            enable_block_checkpointing([block])


RECOMPILE_LIMIT = 16
"""Compiled variants dynamo keeps per block class (torch's default is 8). A class sees one variant per block
kind and input state (Hunyuan-DiT: with/without skip input; LoRA: first block's input without grad) times
one static and up to two dynamic shapes (the second bucket shape, a partial batch); past the limit further
variants run eagerly, with a warning."""


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Let dynamo keep at least ``limit`` compiled variants per code object (process-wide)."""
    import torch._dynamo.config as config

    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    setattr(config, name, max(int(getattr(config, name)), limit))


def compile_blocks(spec: ModelSpec, denoiser: nn.Module, **options: Any) -> int:
    """Regional compilation of ``denoiser``: every block of ``spec.transformer_blocks(denoiser)``.

    Call it on the bare model (before `accelerator.prepare`), with or without gradient checkpointing
    enabled. ``options`` go to `torch.compile` (``backend``, ``mode``, ``dynamic``, ...). Returns the number
    of blocks compiled.
    """
    blocks = spec.transformer_blocks(denoiser)
    if not blocks:
        raise ValueError(f"{type(denoiser).__name__} has no transformer blocks to compile ({spec.block_lists})")
    raise_recompile_limit()
    return compile_modules(blocks, **options)


def compile_problems(device_type: str) -> list[str]:
    """Why `train.compile` cannot work here (for preflight): inductor builds C++ kernels on CPU."""
    if device_type != "cpu":
        return []
    compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    if any(name and shutil.which(name) for name in compilers):
        return []
    return [
        "train.compile on CPU needs a C++ compiler (torch inductor builds C++ kernels): install g++ "
        "(e.g. `apt install g++`) or set CXX, or set train.compile = false"
    ]
