"""`dittune sample`: one image from a model folder, optionally with a dittune LoRA."""

from __future__ import annotations

from pathlib import Path

import torch

from dittune.models.registry import detect_family, spec_class


def run_sample(
    *,
    model: Path,
    prompt: str,
    out: Path,
    lora: Path | None = None,
    negative_prompt: str = "",
    seed: int = 0,
    steps: int = 30,
    guidance: float = 5.0,
    width: int | None = None,
    height: int | None = None,
    family: str | None = None,
    lora_scale: float = 1.0,
) -> Path:
    """Generate with the family's stock pipeline (CPU generator seeded with `seed`) and save a PNG."""
    spec = spec_class(family or detect_family(model))(model)
    for warning in spec.inspect().warnings:
        print(f"warning: {warning}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = spec.load_pipeline(torch.float32).to(device)
    if lora is not None:
        from dittune.lora import load_lora

        load_lora(pipeline, lora, scale=lora_scale)
    default = 8 * int(getattr(spec.denoiser_from_pipeline(pipeline).config, "sample_size", 128))
    width, height = width or default, height or default
    for name, value in (("--width", width), ("--height", height)):
        if value % spec.alignment:
            raise ValueError(f"{name} {value} is not a multiple of {spec.alignment} ({spec.display_name})")
    kwargs = spec.prompt_kwargs(prompt, negative_prompt, width=width, height=height)
    generator = torch.Generator("cpu").manual_seed(seed)
    image = pipeline(**kwargs, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images[0]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out} ({width}×{height}, seed {seed}, {steps} steps, guidance {guidance:g})")
    return out
