"""Every family through the same seam: runs, parity with the stock pipeline, LoRA loading, resume,
cache invalidation and learning — on tiny real pipelines built offline (conftest.FAMILIES)."""

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

from conftest import FAMILIES, assert_images_close, make_dataset, read_image, read_metrics, write_config
from dittune.cli.main import main
from dittune.models.registry import spec_class

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle on a white background"
NEGATIVE = "blurry"
VALIDATION = f"""
[checkpoint]
every_steps = 2
keep_last = 1
[validation]
every_steps = 2
prompts = ["{PROMPT}"]
negative_prompt = "{NEGATIVE}"
steps = 3
guidance = 4.0
[lora]
rank = 4
alpha = 2.0
"""


def _dataset_for(family: str, root: Path) -> Path:
    """Two buckets at the family's alignment: square and 2:1."""
    side = _resolution(family)
    return make_dataset(root, sizes=((side, side), (2 * side, side)))


def _resolution(family: str) -> int:
    return max(64, spec_class(family).alignment)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory: pytest.TempPathFactory, family_models: dict[str, Path]) -> dict[str, Path]:
    """One short LoRA run per family (validation with a negative prompt at steps 0, 2, 4)."""
    runs = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(f"lora-{family}")
        data = _dataset_for(family, root / "data")
        cfg = write_config(
            root / "cfg.toml",
            family_models[family],
            data,
            root / "run",
            VALIDATION,
            family=family,
            learning_rate=1e-2,
        )
        cfg.write_text(cfg.read_text().replace("resolution = 64", f"resolution = {_resolution(family)}"))
        assert main(["train", str(cfg)]) == 0, family
        runs[family] = root / "run"
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_run_outputs(family: str, lora_runs: dict[str, Path]) -> None:
    out = lora_runs[family]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) for m in read_metrics(out))
    for step in (0, 2, 4):
        folder = out / "validation" / f"step_{step:08d}"
        assert (folder / "grid.png").is_file() and len(list(folder.glob("00-*.png"))) == 1
    with safe_open(out / "final" / "lora.safetensors", framework="pt") as handle:
        meta = json.loads(handle.metadata()["dittune_lora"])
        keys = list(handle.keys())
    assert meta["family"] == family and meta["rank"] == 4 and meta["alpha"] == 2.0
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)


@pytest.mark.parametrize("family", FAMILIES)
def test_validation_matches_the_stock_pipeline(family: str, lora_runs: dict[str, Path], family_models) -> None:
    """Step-0 validation (cached embeddings, negative prompt) equals the stock pipeline given the text."""
    import diffusers

    model = family_models[family]
    spec = spec_class(family)(model)
    validation = read_image(next((lora_runs[family] / "validation" / "step_00000000").glob("00-*.png")))
    height, width = validation.shape[:2]
    stock = getattr(diffusers, spec.pipeline_class).from_pretrained(model)
    stock.set_progress_bar_config(disable=True)
    image = stock(
        **spec.prompt_kwargs(PROMPT, NEGATIVE, width=width, height=height),
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]
    assert_images_close(validation, np.asarray(image))


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_with_lora_matches_final_validation(family: str, lora_runs, family_models, tmp_path) -> None:
    """`dittune sample --lora` on the base reproduces the last validation image exactly."""
    out = lora_runs[family]
    validation = next((out / "validation" / "step_00000004").glob("00-*.png"))
    height, width = read_image(validation).shape[:2]
    sample = tmp_path / "sample.png"
    args = ["sample", "--precision", "fp32", "--model", str(family_models[family])]
    args += ["--lora", str(out / "final" / "lora.safetensors")]
    args += ["--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--seed", "0", "--steps", "3", "--guidance", "4"]
    assert main([*args, "--width", str(width), "--height", str(height), "--out", str(sample)]) == 0
    assert_images_close(read_image(sample), read_image(validation))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in ("sd3", "flux")])
def test_stock_load_lora_weights_matches_dittune_load_lora(family: str, lora_runs, family_models) -> None:
    """diffusers' own `load_lora_weights` reads the file with the trained alpha (alpha ≠ rank here)."""
    import diffusers

    import dittune

    model, lora = family_models[family], lora_runs[family] / "final" / "lora.safetensors"
    cls = getattr(diffusers, spec_class(family).pipeline_class)
    stock = cls.from_pretrained(model)
    stock.load_lora_weights(lora)
    ours = dittune.load_lora(cls.from_pretrained(model), lora)
    base = cls.from_pretrained(model)
    width = height = _resolution(family)
    spec = spec_class(family)(model)
    outputs = []
    for pipeline in (stock, ours, base):
        pipeline.set_progress_bar_config(disable=True)
        latents = pipeline(
            **spec.prompt_kwargs(PROMPT, "", width=width, height=height),
            num_inference_steps=2,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(1),
            output_type="latent",
        ).images
        outputs.append(latents)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs[0], outputs[2], atol=1e-4)  # the adapter changes the result


@pytest.mark.parametrize("family", FAMILIES)
def test_full_run_exports_a_stock_pipeline_folder(family: str, family_models, tmp_path) -> None:
    import diffusers

    data = _dataset_for(family, tmp_path / "data")
    cfg = write_config(tmp_path / "cfg.toml", family_models[family], data, tmp_path / "run", family=family)
    cfg.write_text(cfg.read_text().replace("resolution = 64", f"resolution = {_resolution(family)}"))
    assert main(["train", str(cfg), "--set", "train.method=full", "--set", "train.max_steps=2"]) == 0
    spec = spec_class(family)(family_models[family])
    pipeline = getattr(diffusers, spec.pipeline_class).from_pretrained(tmp_path / "run" / "final")
    tuned = pipeline.transformer.state_dict()
    original = load_file(family_models[family] / "transformer" / "diffusion_pytorch_model.safetensors")
    assert tuned.keys() == original.keys()
    assert any(not torch.equal(tuned[k], original[k]) for k in original)


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_is_bit_identical(family: str, family_models, tmp_path) -> None:
    data = _dataset_for(family, tmp_path / "data")
    straight = tmp_path / "straight"
    extra = "[checkpoint]\nevery_steps = 3\nkeep_last = 5\n"
    settings = dict(max_steps=6, lr_scheduler="cosine", lr_warmup_steps=2, caption_dropout=0.3)
    cfg = write_config(tmp_path / "cfg.toml", family_models[family], data, straight, extra, family=family, **settings)
    cfg.write_text(cfg.read_text().replace("resolution = 64", f"resolution = {_resolution(family)}"))
    assert main(["train", str(cfg)]) == 0
    crashed = tmp_path / "crashed"
    shutil.copytree(straight / "checkpoints" / "step_00000003", crashed / "checkpoints" / "step_00000003")
    args = ["train", str(cfg), "--set", f"output_dir={crashed}", "--set", f"cache.dir={straight / 'cache'}"]
    assert main([*args, "--resume", "latest"]) == 0
    a = load_file(straight / "final" / "lora.safetensors")
    b = load_file(crashed / "final" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in read_metrics(straight)][3:] == [m["loss"] for m in read_metrics(crashed)]


@pytest.mark.parametrize("family", FAMILIES)
def test_latents_are_rebuilt_when_the_resolution_changes(family: str, family_models, tmp_path, capsys) -> None:
    data = _dataset_for(family, tmp_path / "data")
    cfg = write_config(tmp_path / "cfg.toml", family_models[family], data, tmp_path / "run", family=family)
    low, high = _resolution(family), 2 * _resolution(family)
    counts = []
    for resolution in (low, high, low):
        assert main(["cache", str(cfg), "--set", f"data.resolution={resolution}"]) == 0
        counts.append(capsys.readouterr().out)
    assert "latents: 0 cached, 8 encoded" in counts[0]
    assert "latents: 0 cached, 8 encoded" in counts[1]  # new size: nothing reused, no advice needed
    assert "latents: 8 cached, 0 encoded" in counts[2]  # the first size's entries are still valid
    # wider images are cropped to the square bucket: a changed crop mode re-encodes the moved crops
    wide = make_dataset(tmp_path / "wide", sizes=((low + low // 4, low),))
    args = ["cache", str(cfg), "--set", f"data.path={json.dumps(str(wide))}", "--set", f"data.resolution={low}"]
    assert main(args) == 0
    assert "latents: 0 cached, 4 encoded" in capsys.readouterr().out
    assert main([*args, "--set", 'data.crop="random"']) == 0
    cached, encoded = map(int, re.search(r"latents: (\d+) cached, (\d+) encoded", capsys.readouterr().out).groups())
    assert cached + encoded == 4 and encoded >= 3, (cached, encoded)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_failing_validation_prompt_never_stops_training(family, family_models, tmp_path, monkeypatch, capsys):
    """The stock pipeline rejects one prompt's arguments: training goes on, the summary names the prompt."""
    spec_cls = spec_class(family)
    original = spec_cls.pipeline_kwargs

    def broken_for_first_prompt(self, positive, negative, **kwargs):
        result = original(self, positive, negative, **kwargs)
        if kwargs["generator"].initial_seed() == 0:  # prompt 0: two generators for one image, which pipelines refuse
            result["generator"] = [kwargs["generator"], kwargs["generator"]]
        return result

    monkeypatch.setattr(spec_cls, "pipeline_kwargs", broken_for_first_prompt)
    data = _dataset_for(family, tmp_path / "data")
    extra = '[validation]\nprompts = ["a broken prompt", "a blue circle"]\nsteps = 2\nat_start = false\n'
    cfg = write_config(tmp_path / "cfg.toml", family_models[family], data, tmp_path / "run", extra, family=family)
    cfg.write_text(cfg.read_text().replace("resolution = 64", f"resolution = {_resolution(family)}"))
    assert main(["train", str(cfg), "--set", "train.max_steps=2"]) == 0
    printed = capsys.readouterr().out
    assert "1 validation image(s) failed" in printed and "a broken prompt" in printed
    folder = tmp_path / "run" / "validation" / "step_00000002"
    assert [p.name for p in folder.glob("0*.png")] == ["01-a-blue-circle.png"]
    assert (tmp_path / "run" / "final" / "lora.safetensors").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_learns_one_image(family: str, family_models, tmp_path) -> None:
    """A LoRA trained on one image: the family's objective falls at fixed draws, and latents sampled
    for the caption move toward the image's latent (several seeds).

    The margins (20 %) reflect tiny random models whose frozen input/output projections a LoRA on the
    attention layers cannot change; a wrong target or a broken forward does not get there.
    """
    import diffusers
    from PIL import ImageDraw

    import dittune
    from dittune.cache.build import LATENT
    from dittune.cache.store import CacheStore
    from dittune.models.base import SampleMeta, TrainBatch

    side = _resolution(family)
    data = tmp_path / "one"
    data.mkdir()
    image = Image.new("RGB", (side, side), (30, 30, 220))
    ImageDraw.Draw(image).ellipse([side // 4, side // 4, 3 * side // 4, 3 * side // 4], (220, 30, 30))
    image.save(data / "a.png")
    caption = "a red circle on a blue background"
    (data / "a.txt").write_text(caption)
    model, out = family_models[family], tmp_path / "run"
    extra = '[checkpoint]\nevery_steps = 1000\n[cache]\nlatent_sampling = "mode"\n'
    cfg = write_config(
        tmp_path / "cfg.toml", model, data, out, extra, family=family, max_steps=200, batch_size=1, learning_rate=2e-3
    )
    cfg.write_text(cfg.read_text().replace("resolution = 64", f"resolution = {side}"))
    assert main(["train", str(cfg)]) == 0

    spec = spec_class(family)(model)
    (entry,) = CacheStore(out / "cache").entries(LATENT)
    moments = {k: v.unsqueeze(0) for k, v in load_file(entry).items()}
    target = spec.latents_from_moments(moments, torch.Generator(), sample=False)[0]
    cls = getattr(diffusers, spec.pipeline_class)
    base_pipe = cls.from_pretrained(model)
    tuned_pipe = dittune.load_lora(cls.from_pretrained(model), out / "final" / "lora.safetensors")

    (text,) = spec.encode_prompts(spec.load_text_encoders(torch.device("cpu"), torch.float32), [caption])
    batch = TrainBatch(
        moments, {k: v.unsqueeze(0) for k, v in text.items()}, [SampleMeta((side,) * 2, (side,) * 2, (0, 0))]
    )
    settings = spec.default_loss_settings("lora")
    settings.sample_latents = False

    def objective(pipeline) -> float:
        generator, scheduler = torch.Generator().manual_seed(123), spec.load_scheduler()
        with torch.no_grad():
            losses = [
                spec.compute_loss(pipeline.transformer, scheduler, batch, generator, settings).loss for _ in range(64)
            ]
        return float(torch.stack(losses).mean())

    assert objective(tuned_pipe) < 0.8 * objective(base_pipe)

    def distances(pipeline) -> list[float]:
        pipeline.set_progress_bar_config(disable=True)
        result = []
        for seed in range(3):
            latents = pipeline(
                **spec.prompt_kwargs(caption, "", width=side, height=side),
                num_inference_steps=20,
                guidance_scale=1.0,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
            ).images
            sampled = spec.pipeline_latents(latents, side, side)[0]
            result.append(((sampled - target) ** 2).mean().item())
        return result

    base, tuned = distances(base_pipe), distances(tuned_pipe)
    assert all(t < 0.8 * b for t, b in zip(tuned, base)), (base, tuned)
