"""FSDP2 for the denoiser, and whole-state gathering that works for every engine.

`shard_denoiser` applies torch's `fully_shard` to each transformer block the spec names
(`ModelSpec.transformer_blocks`), then to the root — the same unit as compilation and checkpointing, so no
family is named here and no `_no_split_modules` guess is needed. Under `accelerate launch` with an FSDP2
config, dittune shards this way with the plugin's settings before the optimizer is built, and accelerate
takes the already-sharded model as it is (it skips its own wrapping) and handles the optimizer and sharded
checkpoints. Frozen bf16/fp16 base weights and fp32 LoRA weights can share a block (FSDP2 gathers by dtype).

`gather_state` and `load_full_state` are the engine-neutral pair the trainer uses for LoRA adapters and the
final export: a sharded module (DTensor parameters) is gathered with torch's distributed state-dict API
(a collective: every process calls it, the main process receives the tensors), anything else through
`accelerator.get_state_dict` (DDP; DeepSpeed ZeRO-3 consolidates there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from dittune.models.base import ModelSpec


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter is a DTensor (FSDP2 / tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(param, DTensor) for param in module.parameters())


def shard_denoiser(
    spec: ModelSpec,
    denoiser: nn.Module,
    *,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
    offload_policy: Any = None,
) -> nn.Module:
    """`fully_shard` every transformer block of `denoiser`, then the root (in place; returns it).

    The default process group is the mesh; parameters must already be on the training device.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options = {
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
        "offload_policy": offload_policy or OffloadPolicy(),
    }
    for block in spec.transformer_blocks(denoiser):
        fully_shard(block, **options)
    fully_shard(denoiser, **options)
    return denoiser


def gather_state(
    module: nn.Module, accelerator: Any = None, keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """The full state dict of `module` on the CPU, keys filtered by `keep`.

    A collective for sharded modules and under DeepSpeed: call it on every process. The main process gets the
    tensors; the others get an empty dict when the module is sharded.
    """
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(module, options=options)
    elif accelerator is not None:
        state = accelerator.get_state_dict(module)
    else:
        state = module.state_dict()
    return {k: v.detach().cpu() for k, v in state.items() if keep is None or keep(k)}


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full (unsharded) tensors for some of `module`'s keys; every process passes the same `state`.

    Every key must exist in the module (a subset of its keys is fine).
    """
    unknown = sorted(set(state) - set(module.state_dict()))
    if unknown:
        raise ValueError(f"tensors that match no parameter of {type(module).__name__}: {unknown[:5]}")
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        module.load_state_dict(state, strict=False)


def as_number_tensor(value: Any) -> torch.Tensor | float:
    """A grad norm as a plain tensor or number: a DTensor (FSDP2) becomes its full value, None (DeepSpeed
    clips inside its engine) becomes NaN."""
    if value is None:
        return float("nan")
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def configure_deepspeed(accelerator: Any, batch_size: int, max_grad_norm: float | None) -> None:
    """Fill the DeepSpeed config values accelerate leaves "auto" when no dataloader is prepared: the micro-batch
    (`train.batch_size`) and the clipping norm (`train.max_grad_norm`; DeepSpeed clips inside its engine)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = batch_size
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = max_grad_norm if max_grad_norm is not None else 0.0


def accelerate_fsdp_options(accelerator: Any) -> dict[str, Any] | None:
    """`shard_denoiser` options from an `accelerate launch` FSDP config; None when the run is not FSDP.

    Only FSDP2 (`fsdp_version: 2`) is supported: ValueError otherwise, naming the fix.
    """
    if str(getattr(accelerator, "distributed_type", "")) not in ("FSDP", "DistributedType.FSDP"):
        return None
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError(
            "dittune shards with FSDP2 only: set `fsdp_version: 2` in the accelerate config's fsdp_config "
            "(see examples/accelerate/fsdp2.yaml)"
        )
    offload = plugin.cpu_offload
    if isinstance(offload, bool):
        from torch.distributed.fsdp import CPUOffloadPolicy

        offload = CPUOffloadPolicy() if offload else None
    return {
        "reshard_after_forward": bool(plugin.reshard_after_forward),
        "mp_policy": plugin.mixed_precision_policy,
        "offload_policy": offload,
    }


def engine_problems(cfg: Any, engine: str) -> list[tuple[str, str]]:
    """(key, message) for options that cannot run under a sharded engine ("fsdp" or "deepspeed")."""
    if engine == "ddp":
        return []
    problems = []
    if cfg.train.blocks_to_swap:
        problems.append(("train.blocks_to_swap", f"{engine} shards the same frozen weights; set it to 0"))
    if cfg.model.base_storage != "default":
        problems.append(("model.base_storage", f'not tested under {engine}; use "default" (or launch with DDP)'))
    if cfg.train.optimizer_offload:
        offload = "fsdp_offload_params" if engine == "fsdp" else "offload_optimizer_device"
        problems.append(("train.optimizer_offload", f"use {engine}'s own offload ({offload} in the accelerate config)"))
    if engine == "deepspeed" and cfg.train.on_nonfinite == "skip":
        problems.append(
            ("train.on_nonfinite", 'DeepSpeed steps inside backward, before a step can be skipped; use "stop"')
        )
    if cfg.train.method == "controlnet":
        problems.append(
            ("train.method", f"ControlNet training is not sharded yet; launch with DDP instead of {engine}")
        )
    return problems
