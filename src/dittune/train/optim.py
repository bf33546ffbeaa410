"""Optimizer and learning-rate schedule from the config."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from dittune.config.schema import TrainSection


def build_optimizer(params: Iterable[torch.nn.Parameter], train: TrainSection) -> torch.optim.Optimizer:
    kwargs = {
        "lr": train.learning_rate,
        "betas": (train.adam_beta1, train.adam_beta2),
        "eps": train.adam_epsilon,
        "weight_decay": train.weight_decay,
    }
    params = list(params)
    if train.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    # The fused kernel is several times faster than the per-parameter loop (CPU and CUDA).
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES for p in params)
    return torch.optim.AdamW(params, fused=fused, **kwargs)


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection) -> torch.optim.lr_scheduler.LRScheduler:
    """A schedule stepped once per optimizer step (steps count optimizer steps)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train.lr_warmup_steps,
        num_training_steps=train.max_steps,
    )
