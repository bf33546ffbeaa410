"""ControlNet training around a frozen denoiser, family-free.

`ControlledDenoiser` is what a ControlNet run hands to the family's `compute_loss` in place of the denoiser: called
exactly like the denoiser, it first runs the ControlNet on the same inputs plus the control latents (set per batch
with `condition`), then the frozen denoiser with the ControlNet's residuals under the family's argument name
(`FamilyFacts.control_argument`). Only the ControlNet trains.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class ControlledDenoiser(nn.Module):
    """A frozen denoiser driven by a trainable ControlNet (see the module docstring)."""

    def __init__(self, denoiser: nn.Module, controlnet: nn.Module, control_argument: str, scale: float = 1.0) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.controlnet = controlnet
        self.control_argument = control_argument
        self.scale = scale
        self._condition: torch.Tensor | None = None
        self._accepted = set(inspect.signature(controlnet.forward).parameters)

    @property
    def dtype(self) -> torch.dtype:
        """The frozen denoiser's compute dtype (what the family casts its inputs to)."""
        from dittune.models.base import denoiser_dtype

        return denoiser_dtype(self.denoiser)

    @property
    def config(self) -> Any:
        return self.denoiser.config

    @contextmanager
    def condition(self, latents: torch.Tensor) -> Iterator[None]:
        """Run the calls inside with these control latents (B, C, h, w), the batch's order."""
        self._condition = latents
        try:
            yield
        finally:
            self._condition = None

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if self._condition is None:
            raise RuntimeError("ControlledDenoiser called outside `condition(latents)`")
        shared = {k: v for k, v in kwargs.items() if k in self._accepted and k != "return_dict"}
        residuals = self.controlnet(
            hidden_states=hidden_states,
            timestep=timestep,
            controlnet_cond=self._condition.to(hidden_states.dtype),
            conditioning_scale=self.scale,
            return_dict=False,
            **shared,
        )[0]
        kwargs[self.control_argument] = list(residuals)  # Hunyuan-DiT pops from the list it gets
        return self.denoiser(hidden_states, timestep=timestep, **kwargs)


def copy_weights(source: nn.Module, target: nn.Module, prefixes: tuple[str, ...]) -> int:
    """Copy every tensor of `source` under one of `prefixes` that `target` has with the same shape (the
    embedders and first blocks a ControlNet starts from); returns how many were copied."""
    own = target.state_dict()
    picked = {
        k: v for k, v in source.state_dict().items() if k.startswith(prefixes) and k in own and own[k].shape == v.shape
    }
    target.load_state_dict(picked, strict=False)
    return len(picked)
