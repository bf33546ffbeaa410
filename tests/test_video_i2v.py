"""Image-to-video end to end: a CogVideoX I2V model (which requires a conditioning image) and LTX-Video (trained
with first-frame conditioning, sampled with LTXImageToVideoPipeline when an image is given) through
`dittune train`, validation and `dittune sample --image`, against the stock I2V pipelines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import assert_images_close, make_video_dataset, write_config
from dittune.cli.main import main
from dittune.media import strip
from dittune.models.registry import spec_class, tiny_builder

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red ball rolling to the right"
FRAMES, FPS, SIDE = 9, 8.0, 64


def _condition(path: Path) -> Path:
    image = Image.new("RGB", (SIDE, SIDE), (30, 30, 220))
    ImageDraw.Draw(image).ellipse([8, 16, 40, 48], (220, 30, 30))
    image.save(path)
    return path


def _strip_png(folder: Path) -> np.ndarray:
    (path,) = folder.glob("00-*.png")
    return np.asarray(Image.open(path).convert("RGB"))


def _train(tmp: Path, family: str, model: Path, image: Path, resolution: int = SIDE) -> Path:
    data = make_video_dataset(tmp / "data", frames=FRAMES, fps=FPS, size=(SIDE + SIDE // 2, SIDE))
    extra = (
        f'[validation]\nprompts = ["{PROMPT}"]\nimages = ["{image}"]\nsteps = 2\nguidance = 4.0\nframes = {FRAMES}\n'
        "[lora]\nrank = 4\nalpha = 2.0\n"
    )
    cfg = write_config(tmp / "cfg.toml", model, data, tmp / "run", extra, family=family, learning_rate=0.01)
    text = cfg.read_text().replace("[train]", f"frames = {FRAMES}\n[train]", 1)
    cfg.write_text(text.replace("resolution = 64", f"resolution = {resolution}"))
    assert main(["train", str(cfg)]) == 0
    return tmp / "run"


@pytest.mark.parametrize("variant", ["1.5-i2v", "1.0-i2v"])
def test_cogvideox_i2v_trains_validates_and_samples_with_the_image(variant: str, tmp_path: Path, capsys) -> None:
    """1.0-I2V has learned positional embeddings for its sample size (64×64 in the tiny model): asked for 96-pixel
    buckets of 96×64 clips, every sample is still planned at 64×64."""
    import diffusers

    import dittune

    model = tiny_builder("cogvideox")(tmp_path / "model", variant=variant, seed=0)
    image = _condition(tmp_path / "first.png")
    out = _train(tmp_path, "cogvideox", model, image, resolution=96 if variant == "1.0-i2v" else SIDE)
    final = _strip_png(out / "validation" / "step_00000004")
    assert final.shape == (SIDE, FRAMES * SIDE, 3)
    assert (out / "validation" / "step_00000000").is_dir()  # at_start: the base model, conditioned too

    # dittune sample --image reproduces the final validation clip
    args = ["sample", "--precision", "fp32", "--model", str(model), "--lora", str(out / "final" / "lora.safetensors")]
    args += ["--prompt", PROMPT, "--image", str(image), "--frames", str(FRAMES), "--fps", str(FPS)]
    args += ["--steps", "2", "--guidance", "4", "--width", str(SIDE), "--height", str(SIDE)]
    assert main([*args, "--out", str(tmp_path / "sample.png")]) == 0
    assert_images_close(np.asarray(Image.open(tmp_path / "sample.png")), final)
    # without the image the I2V model refuses, naming the fix
    assert main([a for a in args if a not in ("--image", str(image))] + ["--out", str(tmp_path / "x.png")]) != 0
    assert "image-to-video: pass --image FILE" in capsys.readouterr().err

    # the stock I2V pipeline's own LoRA loader reads the file as dittune.load_lora applies it
    cls = diffusers.CogVideoXImageToVideoPipeline
    stock, ours = (
        cls.from_pretrained(model),
        dittune.load_lora(cls.from_pretrained(model), out / "final" / "lora.safetensors"),
    )
    stock.load_lora_weights(out / "final" / "lora.safetensors")
    spec = spec_class("cogvideox")(model)
    condition = Image.open(image).convert("RGB")
    outputs = []
    for pipeline in (stock, ours):
        pipeline.set_progress_bar_config(disable=True)
        kwargs = spec.prompt_kwargs(PROMPT, "", width=SIDE, height=SIDE, frames=FRAMES, fps=FPS, image=condition)
        outputs.append(
            pipeline(
                **kwargs,
                num_inference_steps=2,
                guidance_scale=1.0,
                generator=torch.Generator().manual_seed(1),
                output_type="latent",
            ).frames
        )
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


def test_ltx_video_validates_image_to_video_and_honours_the_first_frame(tmp_path: Path) -> None:
    import diffusers

    model = tiny_builder("ltx-video")(tmp_path / "model", seed=0)
    image = _condition(tmp_path / "first.png")
    out = _train(tmp_path, "ltx-video", model, image)
    spec = spec_class("ltx-video")(model)
    condition = Image.open(image).convert("RGB")
    step0 = _strip_png(out / "validation" / "step_00000000")

    # validation with images uses the stock LTXImageToVideoPipeline
    i2v = diffusers.LTXImageToVideoPipeline.from_pretrained(model)
    t2v = diffusers.LTXPipeline.from_pretrained(model)
    frames = {}
    for name, pipeline, given in (("i2v", i2v, condition), ("t2v", t2v, None)):
        pipeline.set_progress_bar_config(disable=True)
        kwargs = spec.prompt_kwargs(PROMPT, "", width=SIDE, height=SIDE, frames=FRAMES, fps=FPS, image=given)
        result = pipeline(
            **kwargs, num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(0)
        )
        frames[name] = spec.output_frames(result)
    assert_images_close(step0, np.asarray(strip(frames["i2v"])))

    # the conditioning image reaches the first frame: its latent is much closer to the image's with the image than
    # without (compared as latents: the tiny VAE's random decoder does not reproduce pixels)
    from dittune.data.transforms import pixels_from_image
    from dittune.data.types import Placement

    pixels = pixels_from_image(condition, Placement((SIDE, SIDE), (SIDE, SIDE), (0, 0)), False)
    vae = spec.load_vae(torch.device("cpu"), torch.float32)
    moments = {k: v.unsqueeze(0) for k, v in spec.encode_pixels(vae, pixels[None, :, None])[0].items()}
    target = spec.latents_from_moments(moments, torch.Generator(), sample=False)[0, :, 0]

    def first_latent_frame(pipeline, given) -> torch.Tensor:
        kwargs = spec.prompt_kwargs(PROMPT, "", width=SIDE, height=SIDE, frames=FRAMES, fps=FPS, image=given)
        latents = pipeline(
            **kwargs,
            num_inference_steps=4,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).frames
        return spec.pipeline_latents(latents, SIDE, SIDE, FRAMES)[0, :, 0]

    with_image = (first_latent_frame(i2v, condition) - target).square().mean()
    without = (first_latent_frame(t2v, None) - target).square().mean()
    assert with_image < 0.25 * without, (float(with_image), float(without))
