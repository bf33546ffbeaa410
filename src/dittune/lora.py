"""`dittune.load_lora`: apply a LoRA file (any format dittune reads) to a stock diffusers pipeline of its family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dittune.export.lora_convert import FamilyUnknown, ResolvedLora, resolve_lora
from dittune.models.lora import inject_exact_lora, inject_lora, load_lora_state_dict
from dittune.models.registry import facts_class, family_names, spec_class


def load_lora(pipeline: Any, path: str | Path, scale: float = 1.0, adapter_name: str = "dittune") -> Any:
    """Inject the adapter from `path` into the pipeline's denoiser and return the pipeline.

    `path`: a dittune (diffusers) file, or a kohya, ComfyUI or official (PEFT folder) LoRA, detected from its
    keys; its family comes from its metadata or module names, else from the pipeline. `scale` multiplies the
    trained strength (alpha / rank). The adapter stays separate from the base weights (peft layers), so the
    result computes exactly what the trained model did.
    """
    try:
        lora = resolve_lora(Path(path))
    except FamilyUnknown:
        lora = None
    family = _pipeline_family(pipeline)
    fits = lora is not None and spec_class(lora.family).accepts_pipeline(type(pipeline).__name__)
    if family is not None and not fits and (lora is None or lora.family_from == "module names"):
        lora = resolve_lora(Path(path), family)  # names several families share: the pipeline's decides
    if lora is None:
        lora = resolve_lora(Path(path))  # raises FamilyUnknown with its message
    spec_cls = spec_class(lora.family)
    if not spec_cls.accepts_pipeline(type(pipeline).__name__):
        raise ValueError(
            f"{path} is a {lora.family} LoRA; it needs a {spec_cls.pipeline_class}, got {type(pipeline).__name__}"
        )
    denoiser = getattr(pipeline, lora.component)
    check_fits(path, lora, denoiser)
    dtype = next(denoiser.parameters()).dtype
    if lora.native:  # a training output: injected exactly as it was trained
        info = lora.info
        inject_lora(denoiser, rank=info.rank, alpha=info.alpha * scale, targets=info.targets, adapter_name=adapter_name)
    else:
        shapes = {name: (module.rank, module.alpha * scale) for name, module in lora.modules.items()}
        inject_exact_lora(denoiser, shapes, adapter_name=adapter_name)
    state = {}
    for name, module in lora.modules.items():
        state[f"{name}.lora_A.weight"] = module.down
        state[f"{name}.lora_B.weight"] = module.up
    load_lora_state_dict(denoiser, state, adapter_name=adapter_name)
    denoiser.to(dtype)
    return pipeline


def check_fits(path: str | Path, lora: ResolvedLora, denoiser: nn.Module) -> None:
    """Raise a ValueError naming the file and the first mismatches when the adapters do not fit `denoiser`'s layers
    (a LoRA of another size or version of the model) or disagree with the rank their file declares."""
    problems: list[str] = []
    declared = lora.info if lora.native else None
    for name, module in lora.modules.items():
        rank = module.rank
        if module.up.shape[1] != rank:
            problems.append(f"{name}: lora_A has rank {rank}, lora_B rank {module.up.shape[1]}")
        if declared is not None and declared.rank_pattern.get(name, declared.rank) != rank:
            wanted = declared.rank_pattern.get(name, declared.rank)
            problems.append(f"{name}: rank {rank} in its tensors, rank {wanted} in the file's metadata")
        try:
            layer = denoiser.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: {type(denoiser).__name__} has no such layer")
            continue
        if isinstance(layer, nn.Linear):
            got = (module.down.shape[-1], module.up.shape[0])
            if got != (layer.in_features, layer.out_features):
                problems.append(
                    f"{name}: adapts {got[0]}→{got[1]} features, the layer is {layer.in_features}→{layer.out_features}"
                )
    if problems:
        shown = "; ".join(problems[:3]) + (f"; ... and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(
            f"{path} does not fit this {type(denoiser).__name__} ({len(problems)} problem(s): {shown}). "
            "Was it trained on another size or version of the model, or is the file damaged?"
        )


def _pipeline_family(pipeline: Any) -> str | None:
    name = type(pipeline).__name__
    return next((family for family in family_names() if facts_class(family).accepts_pipeline(name)), None)
