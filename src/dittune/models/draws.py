"""Random draws for a training batch: per sample, keyed by (seed, step, position in the global batch).

An objective draws its noise, noise levels and other per-sample randomness through a `Draws` object rather
than one generator for the batch. `SampleDraws` gives every sample its own generator, seeded from the run's
seed, the optimizer step and the sample's position in that step's global batch — never from the process or
micro-batch it lands in. How a global batch is split (one process with batch 4, two processes with batch 2,
one process with batch 2 and two accumulation steps) therefore does not change a single random number.

`SharedDraws` wraps one generator and draws the whole batch at once (the numbers `torch.randn(shape,
generator=g)` gives), for tests and callers that hold a plain generator; `as_draws` accepts either.

The first dimension of every requested shape is the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Draws(Protocol):
    """Batch-shaped random tensors; `shape[0]` is the number of samples."""

    def randn(
        self, shape: Sequence[int], *, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor: ...

    def rand(self, shape: Sequence[int], *, device: torch.device | str) -> torch.Tensor: ...

    def randint(self, high: int, shape: Sequence[int], *, device: torch.device | str) -> torch.Tensor: ...


class SharedDraws:
    """One generator for the whole batch: each call is one `torch.rand*` call with `generator`."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def randn(
        self, shape: Sequence[int], *, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, device=device, dtype=dtype)

    def rand(self, shape: Sequence[int], *, device: torch.device | str) -> torch.Tensor:
        return torch.rand(tuple(shape), generator=self.generator, device=device)

    def randint(self, high: int, shape: Sequence[int], *, device: torch.device | str) -> torch.Tensor:
        return torch.randint(0, high, tuple(shape), generator=self.generator, device=device)


class SampleDraws:
    """One generator per sample, seeded by `sample_seed(seed, step, position, purpose)`; each call draws every
    sample's slice from that sample's generator, so a sample's numbers do not depend on its batch-mates."""

    def __init__(
        self, seed: int, step: int, positions: Sequence[int], device: torch.device | str, purpose: str = "noise"
    ) -> None:
        self.positions = list(positions)
        self.generators = [
            torch.Generator(device=device).manual_seed(sample_seed(seed, step, position, purpose))
            for position in self.positions
        ]

    def _check(self, shape: Sequence[int]) -> tuple[int, ...]:
        if not shape or shape[0] != len(self.generators):
            raise ValueError(f"draw of shape {tuple(shape)} for a batch of {len(self.generators)} sample(s)")
        return tuple(shape[1:])

    def randn(
        self, shape: Sequence[int], *, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        each = self._check(shape)
        return torch.stack([torch.randn(each, generator=g, device=device, dtype=dtype) for g in self.generators])

    def rand(self, shape: Sequence[int], *, device: torch.device | str) -> torch.Tensor:
        each = self._check(shape)
        return torch.stack([torch.rand(each, generator=g, device=device) for g in self.generators])

    def randint(self, high: int, shape: Sequence[int], *, device: torch.device | str) -> torch.Tensor:
        each = self._check(shape)
        return torch.stack([torch.randint(0, high, each, generator=g, device=device) for g in self.generators])


def as_draws(source: Draws | torch.Generator) -> Draws:
    """`source` itself, or a `SharedDraws` around a plain generator."""
    return SharedDraws(source) if isinstance(source, torch.Generator) else source


def sample_seed(seed: int, step: int, position: int, purpose: str) -> int:
    """A 63-bit generator seed from (run seed, optimizer step, position in the global batch, purpose)."""
    digest = hashlib.sha256(f"dittune-draw\0{seed}\0{step}\0{position}\0{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
