"""LoRA on any denoiser through peft, independent of the family.

The same injection is used in training and in `dittune.load_lora`, so a loaded adapter computes
exactly what the trained one did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ADAPTER = "default"


def inject_lora(
    denoiser: nn.Module,
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    dropout: float = 0.0,
    adapter_name: str = ADAPTER,
) -> list[str]:
    """Add LoRA layers (B initialised to zero) to modules whose names end with a target.

    Returns the adapted module names. Raises ValueError naming the targets if nothing matched.
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = [name for name, _ in denoiser.named_modules() if any(_matches(name, t) for t in targets)]
    if not names:
        raise ValueError(
            f"lora.targets {list(targets)} match no module of {type(denoiser).__name__}; "
            "use module name suffixes such as 'to_q' or 'attn1.to_out.0'"
        )
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), init_lora_weights=True
    )
    inject_adapter_in_model(config, denoiser, adapter_name=adapter_name)
    return names


def inject_exact_lora(
    denoiser: nn.Module, shapes: dict[str, tuple[int, float]], adapter_name: str = ADAPTER
) -> list[str]:
    """Add LoRA layers to exactly the modules named in `shapes` (name → (rank, alpha)), each with its own rank and
    alpha (a converted file's modules may differ). Raises ValueError naming the modules the denoiser lacks."""
    import re

    from peft import LoraConfig, inject_adapter_in_model

    present = {name for name, _ in denoiser.named_modules()}
    missing = sorted(set(shapes) - present)
    if missing:
        raise ValueError(f"{type(denoiser).__name__} has no modules {missing[:5]} (a LoRA for another model?)")
    ranks = [rank for rank, _ in shapes.values()]
    alphas = [alpha for _, alpha in shapes.values()]
    rank, alpha = max(set(ranks), key=ranks.count), max(set(alphas), key=alphas.count)

    def exact(name: str) -> str:  # peft matches patterns as `(.*\.)?(pattern)$`: anchor at the start
        return r"(?<!.)" + re.escape(name)

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules="^(?:" + "|".join(re.escape(name) for name in shapes) + ")$",
        rank_pattern={exact(name): r for name, (r, _) in shapes.items() if r != rank},
        alpha_pattern={exact(name): a for name, (_, a) in shapes.items() if a != alpha},
        init_lora_weights=True,
    )
    inject_adapter_in_model(config, denoiser, adapter_name=adapter_name)
    return sorted(shapes)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def lora_parameters(denoiser: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in denoiser.named_parameters() if ".lora_" in n]


def lora_state_dict(
    denoiser: nn.Module, adapter_name: str = ADAPTER, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """LoRA tensors keyed like diffusers/peft files (`blocks.0.attn1.to_q.lora_A.weight`): from the module, or
    from `state`, its full state dict gathered elsewhere (a sharded module's own tensors are shards)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser, state_dict=state, adapter_name=adapter_name)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def is_lora_key(key: str) -> bool:
    """Whether a module state-dict key belongs to a LoRA layer."""
    return ".lora_" in key


def lora_module_state(
    denoiser: nn.Module, state: dict[str, torch.Tensor], adapter_name: str = ADAPTER
) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors keyed by the module's own state-dict keys (the adapter name inserted), for loading
    into any module, sharded or not; every tensor must find its place and every adapted module get its tensors."""
    own = [k for k in denoiser.state_dict() if f".lora_A.{adapter_name}." in k or f".lora_B.{adapter_name}." in k]
    by_file_key = {k.replace(f".{adapter_name}.", "."): k for k in own}
    unexpected = [k for k in state if k not in by_file_key]
    if unexpected:
        raise ValueError(f"LoRA tensors that match no adapted module: {unexpected[:5]}")
    missing = [k for k in by_file_key if k not in state]
    if missing:
        raise ValueError(f"LoRA file lacks tensors for adapted modules: {missing[:5]}")
    return {by_file_key[k]: v for k, v in state.items()}


def load_lora_state_dict(denoiser: nn.Module, state: dict[str, torch.Tensor], adapter_name: str = ADAPTER) -> None:
    """Copy LoRA tensors into an injected adapter; every tensor must find its place."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(denoiser, state, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    if unexpected:
        raise ValueError(f"LoRA tensors that match no adapted module: {unexpected[:5]}")
    missing = [
        k
        for k in getattr(result, "missing_keys", [])
        if f".lora_A.{adapter_name}." in k or f".lora_B.{adapter_name}." in k
    ]
    if missing:
        raise ValueError(f"LoRA file lacks tensors for adapted modules: {missing[:5]}")
