"""`dittune sample`: one image or clip from a model folder, optionally with a dittune LoRA."""

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
    frames: int | None = None,
    fps: float | None = None,
    image: Path | None = None,
    low_vram: bool = False,
) -> Path:
    """Generate with the family's stock pipeline (CPU generator seeded with `seed`) and save it at `out`:
    a PNG (for a clip, the strip of all frames), or an MP4, GIF or WebP clip.

    `frames` (video families; snapped down to the family's rule, default its `default_frames`), `fps` (the
    written rate and any frame-rate conditioning) and `image` (the conditioning image of image-to-video).

    `precision` ("auto", "fp32", "bf16", "fp16") follows the training rule: "auto" is bf16 on GPUs and
    CPUs that compute it natively, else fp32; half precisions store the weights in that dtype and run
    under autocast, as validation does.

    `low_vram` (`dittune.sample_low_vram`): encode the prompts, free the text encoders, then denoise and decode
    with VAE tiling (model CPU offload on CUDA, 8-bit T5 there when bitsandbytes is installed); prints the peak
    memory measured. Without it the stock pipeline runs as it is.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = device_precision(precision, device)
    if chosen.name == "fp16" and device.type != "cuda":
        raise ValueError(f'--precision fp16 needs a CUDA GPU (this is {device.type}); use "auto" or "fp32"')
    if chosen.warning:
        print(f"warning: {chosen.warning}")
    from dittune.media import OUTPUT_SUFFIXES, write_frames

    out = Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {out}: use one of {', '.join(OUTPUT_SUFFIXES)}")
    spec_cls = spec_class(family or detect_family(model))
    # the stock pipeline samples with every expert of a model that has several: any one names the spec
    spec = spec_cls(model, expert=next(iter(spec_cls.experts_at(model)), None))
    for warning in spec.inspect().warnings:
        print(f"warning: {warning}")
    rule = spec.frame_rule_at(spec.path)
    if frames is not None and not rule.is_video and frames != 1:
        raise ValueError(f"--frames: {spec.display_name} makes images; leave --frames out")
    count = rule.snap_down(frames or spec.default_frames)
    if frames is not None and count != frames:
        print(f"note: --frames {frames} snapped down to {count} ({spec.display_name} takes {rule} frames)")
    if spec.needs_image and image is None:
        raise ValueError(f"{spec.display_name} at {model} is image-to-video: pass --image FILE")
    if image is not None and not spec.takes_image:
        raise ValueError(f"--image: {spec.display_name} does not take a conditioning image")
    condition = _load_image(image) if image is not None else None
    dtype = DTYPES[chosen.name]
    low = None
    if low_vram:
        from dittune.sample_low_vram import LowVramSampling

        low = LowVramSampling(spec, device, dtype)
        pipeline = low.load(prompt, negative_prompt, conditioned=condition is not None)
    else:
        pipeline = spec.load_pipeline(dtype, conditioned=condition is not None).to(device)
    if lora is not None:
        from dittune.lora import load_lora

        load_lora(pipeline, lora, scale=lora_scale)
    if low is not None:
        low.place(pipeline)
    default_width, default_height = spec.default_size(pipeline)
    width, height = width or default_width, height or default_height
    for name, value in (("--width", width), ("--height", height)):
        if value % spec.alignment:
            raise ValueError(f"{name} {value} is not a multiple of {spec.alignment} ({spec.display_name})")
    rate = fps or spec.default_fps
    if low is not None:
        kwargs = low.call_kwargs(width=width, height=height, frames=count, fps=rate, image=condition)
    else:
        kwargs = spec.prompt_kwargs(
            prompt, negative_prompt, width=width, height=height, frames=count, fps=rate, image=condition
        )
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        output = pipeline(**kwargs, num_inference_steps=steps, guidance_scale=guidance, generator=generator)
    result = spec.output_frames(output)
    if len(result) > 1 and out.suffix.lower() == ".png":
        print(f"note: {out} is a strip of {len(result)} frames, frame 0 at the left")
    write_frames(result, out, rate)
    clip = f", {len(result)} frames at {rate:g} fps" if rule.is_video else ""
    print(f"wrote {out} ({width}×{height}{clip}, seed {seed}, {steps} steps, guidance {guidance:g}, {chosen.name})")
    if low is not None:
        print(low.finish())
    return out


def _load_image(path: Path):
    from PIL import Image, ImageOps

    if not Path(path).is_file():
        raise FileNotFoundError(f"--image {path} does not exist")
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")
