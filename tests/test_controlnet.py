"""ControlNet training: the ControlNet built from the denoiser, its wrapper, and whole runs (resume, export, parity,
learning) on tiny Hunyuan-DiT and SD3 models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import assert_images_close, make_dataset, read_image, write_config
from tests.family_batches import SpecCases, encoded_batch

from dittune.cli.main import main
from dittune.media import load_image
from dittune.models.controlnet import ControlledDenoiser
from dittune.models.registry import spec_class

FAMILIES = ("hunyuan-dit", "sd3")


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> SpecCases:
    return SpecCases(tmp_path_factory.mktemp("controlnet-models"), lambda spec: (spec, encoded_batch(spec)))


def _loss(spec, model, batch) -> torch.Tensor:
    settings = spec.default_loss_settings("lora")
    with torch.no_grad():
        return spec.compute_loss(model, spec.load_scheduler(), batch, torch.Generator().manual_seed(0), settings).loss


@pytest.mark.parametrize("family", FAMILIES)
def test_controlnet_starts_from_the_denoiser_as_a_no_op(cases: SpecCases, family: str) -> None:
    spec, batch = cases[family]
    denoiser = spec.load_denoiser(torch.float32).eval().requires_grad_(False)
    controlnet, trainable = spec.build_controlnet(denoiser, None)
    block = spec.transformer_blocks(controlnet)[0].state_dict()
    assert all(torch.equal(v, spec.transformer_blocks(denoiser)[0].state_dict()[k]) for k, v in block.items())
    model = ControlledDenoiser(denoiser, controlnet.eval(), spec.control_argument)
    control = spec.latents_from_moments(batch.moments, torch.Generator().manual_seed(1), False).flip(-1)
    with model.condition(control):
        assert torch.equal(_loss(spec, model, batch), _loss(spec, denoiser, batch))  # zero-initialised outputs
        with torch.no_grad():
            for param in trainable:
                param.add_(torch.randn_like(param) * 0.05)
        assert not torch.equal(_loss(spec, model, batch), _loss(spec, denoiser, batch))
    names = {id(p) for p in trainable}
    frozen = [n for n, p in controlnet.named_parameters() if id(p) not in names]
    if family == "hunyuan-dit":  # as the official trainer: the embedders stay frozen
        assert frozen and all(
            n.startswith(("pos_embed", "text_embedder", "time_extra_emb", "text_emb")) for n in frozen
        )
    else:  # only the last block's text-stream output, which no residual depends on
        last = f"transformer_blocks.{len(controlnet.transformer_blocks) - 1}."
        assert frozen and all(n.startswith((last + "attn.to_add_out", last + "ff_context")) for n in frozen)
    # every trainable parameter gets a gradient (DDP requires it)
    model.train()
    with model.condition(control):
        settings = spec.default_loss_settings("lora")
        out = spec.compute_loss(model, spec.load_scheduler(), batch, torch.Generator().manual_seed(0), settings)
    out.loss.backward()
    assert [n for n, p in controlnet.named_parameters() if p.requires_grad and p.grad is None] == []


def test_wrapper_refuses_calls_without_a_condition(cases: SpecCases) -> None:
    spec, batch = cases["sd3"]
    denoiser = spec.load_denoiser(torch.float32)
    model = ControlledDenoiser(denoiser, spec.build_controlnet(denoiser, 1)[0], spec.control_argument)
    with pytest.raises(RuntimeError, match="outside `condition"):
        _loss(spec, model, batch)


def test_families_without_a_controlnet_are_refused(family_models: dict[str, Path]) -> None:
    spec = spec_class("flux")(family_models["flux"])
    with pytest.raises(ValueError, match="has no ControlNet"):
        spec.build_controlnet(spec.load_denoiser(torch.float32), None)
    sd3 = spec_class("sd3")(family_models["sd3"])
    with pytest.raises(ValueError, match="read at most"):
        sd3.build_controlnet(sd3.load_denoiser(torch.float32), 3)
    with pytest.raises(ValueError, match="one block per long skip"):
        hunyuan = spec_class("hunyuan-dit")(family_models["hunyuan-dit"])
        hunyuan.build_controlnet(hunyuan.load_denoiser(torch.float32), 5)


def _control_dataset(root: Path, captions: str | None = None) -> Path:
    """Circles with `.txt` captions and, beside each, `<stem>_control.png`: the image inverted."""
    from PIL import Image, ImageOps

    make_dataset(root)
    for image in sorted(root.glob("*.png")):
        ImageOps.invert(Image.open(image).convert("RGB")).save(image.with_name(f"{image.stem}_control.png"))
        if captions is not None:
            image.with_suffix(".txt").write_text(captions)
    return root


def _controlnet_config(path: Path, model: Path, data: Path, out: Path, family: str, **train: object) -> Path:
    control = sorted(data.glob("*_control.png"))[0]
    extra = (
        "[checkpoint]\nevery_steps = 2\nkeep_last = 5\n"
        f'[validation]\nprompts = ["a red circle on a white background"]\ncontrol_images = ["{control}"]\n'
        "steps = 2\nat_start = false\nguidance = 1.0\n"
    )
    return write_config(path, model, data, out, extra, family=family, method="controlnet", **train)


@pytest.mark.parametrize("family", FAMILIES)
def test_controlnet_run_resumes_exports_and_validates_like_the_stock_pipeline(
    family_models: dict[str, Path], tmp_path: Path, family: str
) -> None:
    import diffusers

    data = _control_dataset(tmp_path / "data")
    straight = tmp_path / "straight"
    cfg = _controlnet_config(tmp_path / "cfg.toml", family_models[family], data, straight, family, max_steps=4)
    assert main(["train", str(cfg)]) == 0
    crashed = tmp_path / "crashed"
    (crashed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_00000002", crashed / "checkpoints" / "step_00000002")
    args = ["train", str(cfg), "--set", f"output_dir={crashed}", "--set", f"cache.dir={straight / 'cache'}"]
    assert main([*args, "--resume", "latest"]) == 0

    a = load_file(straight / "final" / "controlnet" / "diffusion_pytorch_model.safetensors")
    b = load_file(crashed / "final" / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    checkpoint = straight / "checkpoints" / "step_00000002"
    assert (checkpoint / "controlnet.safetensors").is_file()
    assert sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) < 3 * sum(v.nbytes for v in a.values())

    spec = spec_class(family)(family_models[family])
    controlnet = getattr(diffusers, spec.controlnet_class).from_pretrained(straight / "final" / "controlnet")
    assert any(v.abs().sum() > 0 for k, v in controlnet.state_dict().items() if "controlnet_blocks" in k)
    pipeline = getattr(diffusers, spec.controlnet_pipeline_class).from_pretrained(
        family_models[family], controlnet=controlnet, torch_dtype=torch.float32
    )
    pipeline.set_progress_bar_config(disable=True)
    prompt = "a red circle on a white background"
    width, height = (64, 64)
    torch.manual_seed(0)  # the pipeline draws the control latents from the global generator, as validation seeds it
    image = pipeline(
        **spec.prompt_kwargs(prompt, "", width=width, height=height),
        control_image=load_image(data / "red_0_control.png"),
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]
    validation = sorted((straight / "validation" / "step_00000004").glob("00-*.png"))[0]
    assert_images_close(np.asarray(image), read_image(validation))
    card = (straight / "final" / "README.md").read_text()
    assert "controlnet" in card and spec.controlnet_class in card


DEMO_BASE = Path(__file__).resolve().parents[1] / "demo" / "base"
RED, BLUE = (220, 40, 40), (40, 60, 200)


def _disc(centre: tuple[int, int], image: Path, control: Path) -> None:
    """A red disc (radius 14) on blue at `centre` of an 80×80 image, and its control: the disc's mask."""
    from PIL import Image, ImageDraw

    x, y = centre
    box = [x - 14, y - 14, x + 14, y + 14]
    picture = Image.new("RGB", (80, 80), BLUE)
    ImageDraw.Draw(picture).ellipse(box, RED)
    picture.save(image)
    mask = Image.new("RGB", (80, 80), (0, 0, 0))
    ImageDraw.Draw(mask).ellipse(box, (255, 255, 255))
    mask.save(control)


def _red_centroid(path: Path) -> tuple[float, float, int]:
    pixels = np.asarray(load_image(path)).astype(float)
    red = (pixels[..., 0] > 150) & (pixels[..., 2] < 120)
    ys, xs = np.nonzero(red)
    return float(xs.mean()), float(ys.mean()), int(red.sum())


def test_controlnet_learns_where_the_control_puts_the_shape(tmp_path: Path) -> None:
    """On the pretrained demo base: 32 red discs at random places, all captioned alike, each with its mask as the
    control. The base draws the disc in the middle whatever the control; after 150 steps the ControlNet puts it
    where the control says (measured 22,22 → 21.8,22.0 and 58,58 → 54.8,58.5 on this CPU)."""
    import random

    data = tmp_path / "data"
    data.mkdir()
    places = random.Random(0)
    for index in range(32):
        centre = (places.randint(18, 62), places.randint(18, 62))
        _disc(centre, data / f"s{index:02d}.png", data / f"s{index:02d}_control.png")
        (data / f"s{index:02d}.txt").write_text("a red circle on a blue background")
    targets = {(22, 22): tmp_path / "top_left", (58, 58): tmp_path / "bottom_right"}
    for centre, stem in targets.items():
        _disc(centre, stem.with_suffix(".png"), stem.with_name(f"{stem.name}_control.png"))
    controls = ", ".join(f'"{stem.with_name(f"{stem.name}_control.png")}"' for stem in targets.values())
    extra = (
        '[validation]\nprompts = ["a red circle on a blue background", "a red circle on a blue background"]\n'
        f"control_images = [{controls}]\nsteps = 20\nguidance = 4.0\n[checkpoint]\nevery_steps = 1000\n"
    )
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "cfg.toml", DEMO_BASE, data, out, extra, method="controlnet", max_steps=150, batch_size=4
    )
    cfg.write_text(cfg.read_text().replace("resolution = 64", "resolution = 80"))
    assert main(["train", str(cfg)]) == 0

    for step, close in (("step_00000000", False), ("step_00000150", True)):
        images = sorted((out / "validation" / step).glob("0*.png"))
        for (x, y), image in zip(targets, images, strict=True):
            cx, cy, area = _red_centroid(image)
            distance = ((cx - x) ** 2 + (cy - y) ** 2) ** 0.5
            if close:
                assert distance < 8 and 300 < area < 1200, (step, (x, y), (cx, cy, area))
            else:
                assert distance > 12, (step, (x, y), (cx, cy, area))
