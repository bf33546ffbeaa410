"""Every video family through the same seam and the same `dittune` commands as the image families: LoRA and
full runs on clips (with a still image in the data), validation clips equal to the stock pipeline frame for
frame, `dittune sample` and diffusers' `load_lora_weights` reproducing the LoRA, bit-exact resume, cache keys
that follow the frame settings, and a LoRA that learns one clip. Tiny real pipelines built offline
(conftest.VIDEO_CASES: each family, plus CogVideoX 1.5 and Wan 2.2 TI2V-5B)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import (
    VIDEO_CASES,
    assert_images_close,
    make_clip,
    make_video_dataset,
    read_image,
    read_metrics,
    write_config,
)
from dittune.cli.main import main
from dittune.media import strip
from dittune.models.registry import spec_class

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red ball rolling to the right"
NEGATIVE = "blurry"
FRAMES = 9
FPS = 8.0
"""The clips' own rate: what validation uses (and LTX-Video conditions on) when no fps is configured."""
SIDE = 64
CLIP_SETTINGS = f"frames = {FRAMES}\n"  # appended to the [data] table
VALIDATION = f"""
[checkpoint]
every_steps = 2
keep_last = 1
[validation]
every_steps = 2
prompts = ["{PROMPT}"]
negative_prompt = "{NEGATIVE}"
steps = 2
guidance = 4.0
frames = {FRAMES}
[lora]
rank = 4
alpha = 2.0
"""


def _dataset(root: Path) -> Path:
    """Two 9-frame clips and one still image (a 1-frame clip)."""
    make_video_dataset(root, frames=FRAMES, fps=FPS, colours=("red", "blue"))
    Image.new("RGB", (SIDE, SIDE), (30, 200, 30)).save(root / "still.png")
    (root / "still.txt").write_text("a green square")
    return root


def _config(tmp: Path, model: Path, data: Path, out: Path, family: str, extra: str = "", **train) -> Path:
    cfg = write_config(tmp / "cfg.toml", model, data, out, extra, family=family, **train)
    text = cfg.read_text().replace("[train]", f"{CLIP_SETTINGS}[train]", 1)
    cfg.write_text(text)
    return cfg


def _stock(family: str, model: Path):
    import diffusers

    pipeline = getattr(diffusers, spec_class(family).pipeline_class).from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class _LoraRuns(dict):
    """family → output folder of one short LoRA run (validation at steps 0, 2, 4), run on first use."""

    def __init__(self, factory: pytest.TempPathFactory, models: dict[str, Path]) -> None:
        super().__init__()
        self.factory, self.models = factory, models

    def __missing__(self, case: str) -> Path:
        family = case.partition("@")[0]
        root = self.factory.mktemp(f"video-lora-{case.replace('@', '-')}")
        cfg = _config(root, self.models[case], _dataset(root / "data"), root / "run", family, VALIDATION)
        assert main(["train", str(cfg), "--set", "train.learning_rate=0.01"]) == 0, case
        self[case] = root / "run"
        return self[case]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory: pytest.TempPathFactory, video_models: dict[str, Path]) -> dict[str, Path]:
    return _LoraRuns(tmp_path_factory, video_models)


@pytest.mark.parametrize("case", VIDEO_CASES)
def test_lora_run_writes_clips_strips_and_a_grid(case: str, lora_runs: dict[str, Path]) -> None:
    family = case.partition("@")[0]
    out = lora_runs[case]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) for m in read_metrics(out))
    for step in (0, 2, 4):
        folder = out / "validation" / f"step_{step:08d}"
        (clip,) = folder.glob("00-*.mp4")
        (strip_png,) = folder.glob("00-*.png")
        assert read_image(strip_png).shape == (SIDE, FRAMES * SIDE, 3)  # frame 0 at the left, all frames
        from dittune.data.video import probe_video

        assert probe_video(clip).frames == FRAMES
        assert (folder / "grid.png").is_file()
    with safe_open(out / "final" / "lora.safetensors", framework="pt") as handle:
        meta = json.loads(handle.metadata()["dittune_lora"])
        keys = list(handle.keys())
    assert meta["family"] == family and meta["rank"] == 4 and meta["alpha"] == 2.0
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)


@pytest.mark.parametrize("case", VIDEO_CASES)
def test_validation_clip_equals_the_stock_pipeline(case: str, lora_runs, video_models) -> None:
    """Step-0 validation (cached embeddings, negative prompt) equals the stock pipeline given the text."""
    family = case.partition("@")[0]
    spec = spec_class(family)(video_models[case])
    (validation,) = (lora_runs[case] / "validation" / "step_00000000").glob("00-*.png")
    output = _stock(family, video_models[case])(
        **spec.prompt_kwargs(PROMPT, NEGATIVE, width=SIDE, height=SIDE, frames=FRAMES, fps=FPS),
        num_inference_steps=2,
        guidance_scale=4.0,
        generator=torch.Generator("cpu").manual_seed(0),
    )
    assert_images_close(read_image(validation), np.asarray(strip(spec.output_frames(output))))


@pytest.mark.parametrize("case", VIDEO_CASES)
def test_sample_with_lora_matches_the_final_validation(case: str, lora_runs, video_models, tmp_path) -> None:
    out = lora_runs[case]
    (validation,) = (out / "validation" / "step_00000004").glob("00-*.png")
    args = ["sample", "--precision", "fp32", "--model", str(video_models[case])]
    args += ["--lora", str(out / "final" / "lora.safetensors"), "--frames", str(FRAMES), "--fps", str(FPS)]
    args += ["--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--seed", "0", "--steps", "2", "--guidance", "4"]
    args += ["--width", str(SIDE), "--height", str(SIDE)]
    assert main([*args, "--out", str(tmp_path / "sample.png")]) == 0
    assert_images_close(read_image(tmp_path / "sample.png"), read_image(validation))
    assert main([*args, "--out", str(tmp_path / "sample.gif")]) == 0
    with Image.open(tmp_path / "sample.gif") as gif:
        assert gif.n_frames == FRAMES


@pytest.mark.parametrize("case", VIDEO_CASES)
def test_stock_load_lora_weights_matches_dittune_load_lora(case: str, lora_runs, video_models) -> None:
    """diffusers' own `load_lora_weights` reads the file with the trained alpha (alpha ≠ rank here)."""
    family = case.partition("@")[0]
    import dittune

    model, lora = video_models[case], lora_runs[case] / "final" / "lora.safetensors"
    stock = _stock(family, model)
    stock.load_lora_weights(lora)
    ours = dittune.load_lora(_stock(family, model), lora)
    spec = spec_class(family)(model)
    outputs = [
        pipeline(
            **spec.prompt_kwargs(PROMPT, "", width=SIDE, height=SIDE, frames=FRAMES, fps=FPS),
            num_inference_steps=2,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(1),
            output_type="latent",
        ).frames
        for pipeline in (stock, ours, _stock(family, model))
    ]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs[0], outputs[2], atol=1e-4)  # the adapter changes the result


@pytest.mark.parametrize("case", VIDEO_CASES)
def test_full_run_exports_a_stock_pipeline_folder(case: str, video_models, tmp_path) -> None:
    family = case.partition("@")[0]
    model = video_models[case]
    cfg = _config(tmp_path, model, _dataset(tmp_path / "data"), tmp_path / "run", family)
    args = ["--set", "train.method=full", "--set", "train.max_steps=2", "--set", "train.gradient_checkpointing=true"]
    assert main(["train", str(cfg), *args]) == 0
    tuned = _stock(family, tmp_path / "run" / "final").transformer.state_dict()
    original = load_file(model / "transformer" / "diffusion_pytorch_model.safetensors")
    assert tuned.keys() == original.keys()
    assert any(not torch.equal(tuned[k], original[k]) for k in original)


@pytest.mark.parametrize("case", VIDEO_CASES)
def test_resume_is_bit_identical(case: str, video_models, tmp_path) -> None:
    family = case.partition("@")[0]
    data = _dataset(tmp_path / "data")
    straight = tmp_path / "straight"
    extra = "[checkpoint]\nevery_steps = 3\nkeep_last = 5\n"
    settings = dict(max_steps=6, lr_scheduler="cosine", lr_warmup_steps=2, caption_dropout=0.3)
    cfg = _config(tmp_path, video_models[case], data, straight, family, extra, **settings)
    assert main(["train", str(cfg)]) == 0
    crashed = tmp_path / "crashed"
    shutil.copytree(straight / "checkpoints" / "step_00000003", crashed / "checkpoints" / "step_00000003")
    args = ["train", str(cfg), "--set", f"output_dir={crashed}", "--set", f"cache.dir={straight / 'cache'}"]
    assert main([*args, "--resume", "latest"]) == 0
    a = load_file(straight / "final" / "lora.safetensors")
    b = load_file(crashed / "final" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in read_metrics(straight)][3:] == [m["loss"] for m in read_metrics(crashed)]


@pytest.mark.parametrize("case", VIDEO_CASES)
def test_frame_settings_re_encode_exactly_the_affected_clips(case: str, video_models, tmp_path, capsys) -> None:
    family = case.partition("@")[0]
    data = _dataset(tmp_path / "data")  # two 9-frame clips at 8 fps and a still
    make_clip(data / "long.mp4", 17, colour="yellow")
    (data / "long.txt").write_text("a yellow ball")
    cfg = _config(tmp_path, video_models[case], data, tmp_path / "run", family)

    def counts(*overrides: str) -> tuple[int, int]:
        args = ["cache", str(cfg)]
        for override in overrides:
            args += ["--set", override]
        assert main(args) == 0
        found = re.search(r"latents: (\d+) cached, (\d+) encoded", capsys.readouterr().out)
        return int(found[1]), int(found[2])

    assert counts() == (0, 4)
    assert counts() == (4, 0)
    assert counts("data.frames=5") == (1, 3)  # every clip re-encoded, the still kept
    assert counts('data.frame_sampling="middle"') == (3, 1)  # only the long clip has room to move
    assert counts("data.fps=4") == (1, 1)  # 9 frames at 4 fps span 2 s: only the long clip fits, the rest skipped
    assert counts() == (4, 0)  # the first settings' entries are still valid
    assert counts("cache.vae_tiling=true") == (0, 4)  # tiling changes latents: its own entries


@pytest.mark.parametrize("case", VIDEO_CASES)
def test_lora_learns_one_clip(case: str, video_models, tmp_path) -> None:
    """A LoRA trained on one clip: the objective falls at fixed draws, and clips sampled for the caption move
    toward the clip's latents (several seeds). Margins as the image families' test (tiny random models)."""
    family = case.partition("@")[0]
    import dittune
    from dittune.cache.build import LATENT
    from dittune.cache.store import CacheStore
    from dittune.models.base import SampleMeta, TrainBatch

    data = make_video_dataset(tmp_path / "one", frames=FRAMES, fps=FPS, colours=("red",))
    caption = (data / "red.txt").read_text()
    model, out = video_models[case], tmp_path / "run"
    extra = '[checkpoint]\nevery_steps = 1000\n[cache]\nlatent_sampling = "mode"\n'
    cfg = _config(tmp_path, model, data, out, family, extra, max_steps=150, batch_size=1, learning_rate=2e-3)
    assert main(["train", str(cfg)]) == 0

    spec = spec_class(family)(model)
    (entry,) = CacheStore(out / "cache").entries(LATENT)
    moments = {k: v.unsqueeze(0) for k, v in load_file(entry).items()}
    target = spec.latents_from_moments(moments, torch.Generator(), sample=False)[0]
    base_pipe = _stock(family, model)
    tuned_pipe = dittune.load_lora(_stock(family, model), out / "final" / "lora.safetensors")
    (text,) = spec.encode_prompts(spec.load_text_encoders(torch.device("cpu"), torch.float32), [caption])
    meta = SampleMeta((SIDE, SIDE), (SIDE, SIDE), (0, 0), frames=FRAMES, fps=FPS)
    batch = TrainBatch(moments, {k: v.unsqueeze(0) for k, v in text.items()}, [meta])
    settings = spec.default_loss_settings("lora")
    settings.sample_latents = False

    def objective(pipeline) -> float:
        generator, scheduler = torch.Generator().manual_seed(123), spec.load_scheduler()
        with torch.no_grad():
            losses = [
                spec.compute_loss(pipeline.transformer, scheduler, batch, generator, settings).loss for _ in range(32)
            ]
        return float(torch.stack(losses).mean())

    assert objective(tuned_pipe) < 0.8 * objective(base_pipe)

    def distances(pipeline) -> list[float]:
        result = []
        for seed in range(3):
            latents = pipeline(
                **spec.prompt_kwargs(caption, "", width=SIDE, height=SIDE, frames=FRAMES, fps=FPS),
                num_inference_steps=10,
                guidance_scale=1.0,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
            ).frames
            sampled = spec.pipeline_latents(latents, SIDE, SIDE, FRAMES)[0]
            result.append(((sampled - target) ** 2).mean().item())
        return result

    base, tuned = distances(base_pipe), distances(tuned_pipe)
    assert all(t < 0.8 * b for t, b in zip(tuned, base)), (base, tuned)
