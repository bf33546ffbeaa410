"""`dittune.load_lora`: apply a dittune LoRA file to a stock diffusers pipeline of its family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dittune.export.lora_file import read_lora
from dittune.models.lora import inject_lora, load_lora_state_dict
from dittune.models.registry import spec_class


def load_lora(pipeline: Any, path: str | Path, scale: float = 1.0, adapter_name: str = "dittune") -> Any:
    """Inject the adapter from `path` into the pipeline's denoiser and return the pipeline.

    `scale` multiplies the trained strength (alpha / rank). The adapter stays separate from the
    base weights (peft layers), so the result computes exactly what the trained model did.
    """
    state, info = read_lora(Path(path))
    spec_cls = spec_class(info.family)
    if not spec_cls.accepts_pipeline(type(pipeline).__name__):
        raise TypeError(
            f"{path} is a {info.family} LoRA; it needs a {spec_cls.pipeline_class}, got {type(pipeline).__name__}"
        )
    denoiser = getattr(pipeline, info.component)
    dtype = next(denoiser.parameters()).dtype
    inject_lora(denoiser, rank=info.rank, alpha=info.alpha * scale, targets=info.targets, adapter_name=adapter_name)
    load_lora_state_dict(denoiser, state, adapter_name=adapter_name)
    denoiser.to(dtype)
    return pipeline
