"""Shared test helpers: a real training batch and a deeper LoRA denoiser for any family."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dittune.models.base import ModelSpec, SampleMeta, TrainBatch
from dittune.models.lora import inject_lora
from dittune.models.registry import spec_class, tiny_builder


def encoded_batch(spec: ModelSpec, size: int = 32) -> TrainBatch:
    """Two samples (clips of the family's shortest length for video) through its own encoders and VAE."""
    cpu = torch.device("cpu")
    rule = spec.frame_rule_at(spec.path)
    frames = rule.multiple + 1 if rule.is_video else 1
    prompts = ["a red ball rolling to the right", "a blue ball"]
    text = spec.encode_prompts(spec.load_text_encoders(cpu, torch.float32), prompts)
    pixels = torch.rand(2, 3, frames, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        moments = spec.encode_pixels(spec.load_vae(cpu, torch.float32), pixels)
    meta = SampleMeta((size, size), (size, size), (0, 0), frames=frames, fps=16.0 if rule.is_video else None)
    return TrainBatch(
        moments={k: torch.stack([m[k] for m in moments]) for k in moments[0]},
        text={k: torch.stack([t[k] for t in text]) for k in text[0]},
        meta=[meta] * len(prompts),
    )


def deeper_lora_denoiser(spec: ModelSpec, layers: int) -> nn.Module:
    """The family's denoiser class with at least `layers` blocks per list, and a LoRA whose B is non-zero (so A
    learns)."""
    tiny = spec.load_denoiser(torch.float32)
    config = dict(tiny.config)
    for key in ("num_layers", "num_single_layers"):
        if key in config:
            config[key] = max(config[key], layers)
    torch.manual_seed(0)
    model = type(tiny).from_config(config)
    model.requires_grad_(False)
    inject_lora(model, rank=4, alpha=4.0, targets=list(spec.default_lora_targets))
    generator = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        param.requires_grad_("lora_" in name)
    return model.train()


class SpecCases(dict):
    """family → `make(spec)` of a tiny model of that family (built in `root`), on first use."""

    def __init__(self, root: Path, make: Callable[[ModelSpec], Any]) -> None:
        super().__init__()
        self.root, self.make = root, make

    def __missing__(self, family: str) -> Any:
        self[family] = self.make(spec_class(family)(tiny_builder(family)(self.root / family, seed=0)))
        return self[family]
