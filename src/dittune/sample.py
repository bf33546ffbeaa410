"""`dittune sample`: one image from a model folder, optionally with a dittune LoRA."""

from __future__ import annotations

from pathlib import Path

import torch

from dittune.cache.build import DTYPES
from dittune.models.registry import detect_family, spec_class
from dittune.precision import device_precision


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
    precision: str = "auto",
) -> Path:
    """Generate with the family's stock pipeline (CPU generator seeded with `seed`) and save a PNG.

    `precision` ("auto", "fp32", "bf16", "fp16") follows the training rule: "auto" is bf16 on GPUs and
    CPUs that compute it natively, else fp32; half precisions store the weights in that dtype and run
    under autocast, as validation does.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = device_precision(precision, device)
    if chosen.name == "fp16" and device.type != "cuda":
        raise ValueError(f'--precision fp16 needs a CUDA GPU (this is {device.type}); use "auto" or "fp32"')
    if chosen.warning:
        print(f"warning: {chosen.warning}")
    spec = spec_class(family or detect_family(model))(model)
    for warning in spec.inspect().warnings:
        print(f"warning: {warning}")
    dtype = DTYPES[chosen.name]
    pipeline = spec.load_pipeline(dtype).to(device)
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
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        image = pipeline(**kwargs, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images[0]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out} ({width}×{height}, seed {seed}, {steps} steps, guidance {guidance:g}, {chosen.name})")
    return out
