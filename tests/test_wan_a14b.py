"""Wan 2.2 A14B (two experts, `transformer` above `boundary_ratio`, `transformer_2` below) on a tiny offline build:
`model.expert` chooses the trained expert, training draws σ on its side of the boundary only, validation samples
with the whole two-expert pipeline, the LoRA file loads with diffusers' own loader into the right expert, a full
run exports a stock folder where only the trained expert changed, and resume is bit-identical."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import assert_images_close, make_video_dataset, read_image, read_metrics, write_config
from dittune.cli.main import main
from dittune.media import strip
from dittune.models import flow_objective as flow
from dittune.models.base import LossSettings
from dittune.models.wan.spec import WanSpec
from dittune.models.wan.tiny import build_tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, NEGATIVE = "a red ball rolling to the right", "blurry"
FRAMES, FPS, SIDE, BOUNDARY = 9, 8.0, 64, 0.875
COMPONENT = {"high_noise": "transformer", "low_noise": "transformer_2"}
VALIDATION = f"""
[checkpoint]
every_steps = 1000
[validation]
prompts = ["{PROMPT}"]
negative_prompt = "{NEGATIVE}"
steps = 2
guidance = 4.0
frames = {FRAMES}
[lora]
rank = 4
alpha = 2.0
"""
"""Two validation steps: timesteps 999 (the high-noise expert) and 750 (the low-noise one)."""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_wan(tmp_path_factory.mktemp("a14b") / "model", "2.2-a14b", seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video_dataset(tmp_path_factory.mktemp("clips") / "data", frames=FRAMES, fps=FPS)


def _config(path: Path, model: Path, data: Path, out: Path, expert: str | None, extra: str = "", **train) -> Path:
    """A config with 9-frame clips, the shared cache (the text and latents do not depend on the expert) and
    `model.expert` (None: left out)."""
    cfg = write_config(path, model, data, out, extra, family="wan", **train)
    text = cfg.read_text().replace("[train]", f"frames = {FRAMES}\n[train]", 1)
    if expert is not None:
        text = text.replace("[data]", f'expert = "{expert}"\n[data]', 1)
    cfg.write_text(text + f'[cache]\ndir = "{data.parent / "cache"}"\n')
    return cfg


class _LoraRuns(dict):
    """expert → output folder of a 2-step LoRA run validated at steps 0 and 2, run on first use."""

    def __init__(self, root: Path, model: Path, data: Path) -> None:
        super().__init__()
        self.root, self.model, self.data = root, model, data

    def __missing__(self, expert: str) -> Path:
        out = self.root / expert
        cfg = _config(self.root / f"{expert}.toml", self.model, self.data, out, expert, VALIDATION, max_steps=2)
        assert main(["train", str(cfg), "--set", "train.learning_rate=0.01"]) == 0
        self[expert] = out
        return out


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory: pytest.TempPathFactory, model: Path, data: Path) -> dict[str, Path]:
    return _LoraRuns(tmp_path_factory.mktemp("a14b-lora"), model, data)


def _stock(model: Path):
    from diffusers import WanPipeline

    pipeline = WanPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _clip(pipeline, spec: WanSpec, negative: str = NEGATIVE, guidance: float = 4.0, **options):
    return pipeline(
        **spec.prompt_kwargs(PROMPT, negative, width=SIDE, height=SIDE, frames=FRAMES, fps=FPS),
        num_inference_steps=2,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(0),
        **options,
    )


def test_the_expert_is_required_and_checked(model: Path, data: Path, tmp_path: Path) -> None:
    """The spec needs `expert` for an A14B folder and refuses one for a single-denoiser folder; `dittune config
    check` reports both under `model.expert` without importing torch."""
    assert WanSpec.check_folder(model) == [] and WanSpec.experts_at(model) == COMPONENT
    with pytest.raises(ValueError, match=r"model\.expert.*'high_noise' \(trains transformer\).*'low_noise'"):
        WanSpec(model)
    with pytest.raises(ValueError, match="unknown expert 'middle'"):
        WanSpec(model, expert="middle")
    for expert, component in COMPONENT.items():
        spec = WanSpec(model, expert=expert)
        assert spec.denoiser_component == component and spec.frozen_experts == [
            c for c in COMPONENT.values() if c != component
        ]
        assert spec.pipeline_init_extras == {"boundary_ratio": BOUNDARY} and spec.inspect().version == "2.2 A14B"
    assert WanSpec.denoiser_component == "transformer"  # the instance's choice does not leak into the class
    single = tmp_path / "single"
    shutil.copytree(model, single, ignore=shutil.ignore_patterns("transformer_2"))
    index = json.loads((single / "model_index.json").read_text())
    (single / "model_index.json").write_text(
        json.dumps({**index, "transformer_2": [None, None], "boundary_ratio": None})
    )
    assert WanSpec.experts_at(single) == {} and WanSpec(single).inspect().version == "2.1"
    with pytest.raises(ValueError, match=r"single denoiser; remove model\.expert"):
        WanSpec(single, expert="high_noise")
    broken = tmp_path / "broken"
    shutil.copytree(model, broken, ignore=shutil.ignore_patterns("transformer_2"))
    (problem,) = WanSpec.check_folder(broken)
    assert "lacks the transformer_2/ subfolder" in problem

    configs = {
        name: _config(tmp_path / f"{name}.toml", folder, data, tmp_path / "run", expert)
        for name, folder, expert in (
            ("none", model, None),
            ("single", single, "low_noise"),
            ("good", model, "low_noise"),
        )
    }
    code = (
        "import sys\nfrom dittune.cli.main import main\n"
        f"codes = [main(['config', 'check', path]) for path in {[str(c) for c in configs.values()]!r}]\n"
        "print('RESULT', codes, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "RESULT [1, 1, 0] False" in result.stdout, result.stdout + result.stderr
    errors = result.stderr.splitlines()
    assert any(
        line.strip().startswith("model.expert:") and "'low_noise' (trains transformer_2)" in line for line in errors
    )
    assert any(line.strip().startswith("model.expert:") and "remove model.expert" in line for line in errors)


@pytest.mark.parametrize(
    "settings",
    [
        LossSettings(timestep_sampling="shift"),
        LossSettings(timestep_sampling="uniform"),
        LossSettings(timestep_sampling="logit_normal", logit_mean=0.5),
        LossSettings(timestep_sampling="mode", flow_shift=2.0),
    ],
    ids=["shift", "uniform", "logit_normal", "mode"],
)
def test_each_expert_draws_sigma_on_its_side_of_the_boundary(model: Path, settings: LossSettings) -> None:
    """σ is the usual draw restricted to [0.875, 1) (high noise) or (0, 0.875) (low noise): it follows the draw's
    distribution conditioned on the range (compared with rejection sampling), one draw per sample."""
    count = 40_000
    specs = {expert: WanSpec(model, expert=expert) for expert in COMPONENT}
    shift = specs["high_noise"].sampling_shift(settings)
    options = {"logit_mean": settings.logit_mean, "logit_std": settings.logit_std, "mode_scale": settings.mode_scale}
    plain = flow.sample_sigmas(
        count * 8, settings.timestep_sampling, generator=torch.Generator().manual_seed(1), shift=shift, **options
    )
    quantiles = torch.linspace(0.05, 0.95, 10)
    for expert, spec in specs.items():
        low, high = spec.sigma_range
        assert (low, high) == ((BOUNDARY, 1.0) if expert == "high_noise" else (0.0, BOUNDARY))
        generator = torch.Generator().manual_seed(2)
        drawn = flow.sample_sigmas(
            count, settings.timestep_sampling, generator=generator, shift=shift, within=spec.sigma_range, **options
        )
        assert drawn.dtype == torch.float32 and bool(((drawn >= low) & (drawn < high)).all())
        reference = plain[(plain >= low) & (plain < high)]
        torch.testing.assert_close(drawn.quantile(quantiles), reference.quantile(quantiles), rtol=0, atol=0.01)
        # the objective gives the transformer these σ (timestep = 1000·σ) and says so at start-up
        x0 = torch.zeros(count, 1)
        sigmas, _, _ = flow.training_draw(x0, settings, torch.Generator().manual_seed(2), shift, spec.sigma_range)
        assert torch.equal(sigmas, drawn)
        bracket = f"[{BOUNDARY:g}, 1)" if expert == "high_noise" else f"(0, {BOUNDARY:g})"
        assert f"{expert} expert ({COMPONENT[expert]}): σ in {bracket}" in spec.describe_objective(settings)
    unrestricted = flow.sample_sigmas(
        64, settings.timestep_sampling, generator=torch.Generator().manual_seed(3), shift=shift, **options
    )
    whole = flow.sample_sigmas(
        64,
        settings.timestep_sampling,
        generator=torch.Generator().manual_seed(3),
        shift=shift,
        within=(0.0, 1.0),
        **options,
    )
    torch.testing.assert_close(whole, unrestricted, rtol=0, atol=1e-5)  # the whole range is the usual draw


@pytest.mark.parametrize("expert", list(COMPONENT))
def test_a_lora_run_trains_one_expert_and_validates_with_both(
    expert: str, lora_runs: dict[str, Path], model: Path
) -> None:
    """The run trains σ on its expert's side only; validation (both experts, switched at the boundary) equals the
    stock A14B pipeline before training and the stock pipeline with the LoRA in the trained expert after it."""
    import dittune

    out = lora_runs[expert]
    sigmas = [m["sigma_mean"] for m in read_metrics(out)]
    assert len(sigmas) == 2 and all((s >= BOUNDARY) == (expert == "high_noise") for s in sigmas), sigmas
    lora = out / "final" / "lora.safetensors"
    with safe_open(lora, framework="pt") as handle:
        meta = json.loads(handle.metadata()["dittune_lora"])
        peft = json.loads(handle.metadata()["lora_adapter_metadata"])
        keys = list(handle.keys())
    assert meta["component"] == COMPONENT[expert] and meta["version"] == "2.2 A14B"
    assert meta.get("key_prefix") == ("transformer" if expert == "low_noise" else None)  # high: the usual file
    assert keys and all(k.startswith("transformer.blocks.") for k in keys) and peft["transformer.lora_alpha"] == 2.0

    spec = WanSpec(model, expert=expert)
    (before,) = (out / "validation" / "step_00000000").glob("00-*.png")
    assert_images_close(read_image(before), np.asarray(strip(spec.output_frames(_clip(_stock(model), spec)))))
    tuned = dittune.load_lora(_stock(model), lora)
    trained, other = (getattr(tuned, c) for c in (COMPONENT[expert], spec.frozen_experts[0]))
    assert hasattr(trained, "peft_config") and not hasattr(other, "peft_config")
    (after,) = (out / "validation" / "step_00000002").glob("00-*.png")
    assert_images_close(read_image(after), np.asarray(strip(spec.output_frames(_clip(tuned, spec)))))
    assert np.abs(read_image(after).astype(int) - read_image(before).astype(int)).max() > 2  # the LoRA changed the clip


@pytest.mark.parametrize("expert", list(COMPONENT))
def test_stock_load_lora_weights_matches_dittune_load_lora(expert: str, lora_runs, model: Path) -> None:
    """diffusers' documented Wan 2.2 loading (`load_into_transformer_2=True` for the low-noise expert) reads our
    file with the trained alpha and gives what `dittune.load_lora` gives."""
    import dittune

    lora = lora_runs[expert] / "final" / "lora.safetensors"
    stock = _stock(model)
    stock.load_lora_weights(str(lora), **({"load_into_transformer_2": True} if expert == "low_noise" else {}))
    assert hasattr(getattr(stock, COMPONENT[expert]), "peft_config")
    spec = WanSpec(model, expert=expert)
    outputs = [
        _clip(pipeline, spec, negative="", guidance=1.0, output_type="latent").frames
        for pipeline in (stock, dittune.load_lora(_stock(model), lora), _stock(model))
    ]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs[0], outputs[2], atol=1e-4)  # the adapter changes the result


def test_sample_with_a_low_noise_lora_matches_the_final_validation(lora_runs, model: Path, tmp_path: Path) -> None:
    """`dittune sample` loads the whole A14B pipeline and puts the LoRA into the expert named in its file."""
    args = ["sample", "--precision", "fp32", "--model", str(model), "--prompt", PROMPT, "--negative-prompt", NEGATIVE]
    args += ["--lora", str(lora_runs["low_noise"] / "final" / "lora.safetensors"), "--frames", str(FRAMES)]
    args += ["--fps", str(FPS), "--seed", "0", "--steps", "2", "--guidance", "4", "--width", "64", "--height", "64"]
    assert main([*args, "--out", str(tmp_path / "sample.png")]) == 0
    (validation,) = (lora_runs["low_noise"] / "validation" / "step_00000002").glob("00-*.png")
    assert_images_close(read_image(tmp_path / "sample.png"), read_image(validation))


def test_a_full_run_on_the_low_noise_expert_changes_only_transformer_2(model: Path, data: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path / "cfg.toml", model, data, tmp_path / "run", "low_noise", max_steps=1, method="full")
    assert main(["train", str(cfg)]) == 0
    final = tmp_path / "run" / "final"
    exported = _stock(final)
    assert exported.config.boundary_ratio == BOUNDARY
    weights = "diffusion_pytorch_model.safetensors"
    for name in ("transformer", "vae", "text_encoder"):
        (original,) = (model / name).glob("*.safetensors")
        assert (final / name / original.name).read_bytes() == original.read_bytes(), name
    tuned, original = load_file(final / "transformer_2" / weights), load_file(model / "transformer_2" / weights)
    assert tuned.keys() == original.keys() and any(not torch.equal(tuned[k], original[k]) for k in original)


def test_resume_is_bit_identical(model: Path, data: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    extra = "[checkpoint]\nevery_steps = 2\nkeep_last = 5\n"
    settings = dict(max_steps=4, lr_scheduler="cosine", lr_warmup_steps=1, caption_dropout=0.3)
    cfg = _config(tmp_path / "cfg.toml", model, data, straight, "low_noise", extra, **settings)
    assert main(["train", str(cfg)]) == 0
    crashed = tmp_path / "crashed"
    shutil.copytree(straight / "checkpoints" / "step_00000002", crashed / "checkpoints" / "step_00000002")
    assert main(["train", str(cfg), "--set", f"output_dir={crashed}", "--resume", "latest"]) == 0
    a = load_file(straight / "final" / "lora.safetensors")
    b = load_file(crashed / "final" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in read_metrics(straight)][2:] == [m["loss"] for m in read_metrics(crashed)]
