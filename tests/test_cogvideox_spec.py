"""CogVideoX (1.0/1.5, T2V/I2V) against diffusers itself: prompt encoding, the scheduler's shifted ᾱ, x0
recovery, the transformer inputs of the stock pipelines (RoPE, 1.5's padding, ofs, I2V conditioning),
the cached first-frame augmentation, and sampling from cached embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from dittune.models.base import LossSettings, SampleMeta, TrainBatch
from dittune.models.cogvideox.spec import CogVideoXSpec

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
VARIANTS = ("1.0", "1.5", "1.0-i2v", "1.5-i2v")
PROMPT, NEGATIVE = "a red ball rolling on a blue background", "blurry"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from dittune.models.registry import tiny_builder

    root = tmp_path_factory.mktemp("cogvideox")
    return {variant: tiny_builder("cogvideox")(root / variant, variant=variant, seed=0) for variant in VARIANTS}


def _stock(spec: CogVideoXSpec) -> Any:
    import diffusers

    pipeline = getattr(diffusers, spec.sampling_pipeline_class(spec.is_i2v)).from_pretrained(spec.path)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _clip(frames: int = 9, seed: int = 0) -> torch.Tensor:
    """(1, 3, frames, 64, 64) in [-1, 1]: smooth random content."""
    coarse = torch.rand(1, 3, frames, 8, 8, generator=torch.Generator().manual_seed(seed))
    return nn.functional.interpolate(coarse, size=(frames, 64, 64), mode="trilinear") * 2 - 1


def _first_frame_image() -> Image.Image:
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    ImageDraw.Draw(image).ellipse([12, 20, 40, 48], (220, 30, 30))
    return image


def _batch(spec: CogVideoXSpec, moments: dict[str, torch.Tensor], size: int = 1) -> TrainBatch:
    (text,) = spec.encode_prompts(spec.load_text_encoders(CPU, torch.float32), [PROMPT])
    moments = {key: value.expand(size, *value.shape[1:]) for key, value in moments.items()}
    meta = [SampleMeta((64, 64), (64, 64), (0, 0), frames=9, fps=8.0)] * size
    return TrainBatch(moments=moments, text={"t5_embeds": text["t5_embeds"].expand(size, -1, -1)}, meta=meta)


def _encoded(spec: CogVideoXSpec, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    (entry,) = spec.encode_pixels(spec.load_vae(CPU, torch.float32), pixels)
    return {key: value.unsqueeze(0) for key, value in entry.items()}


class Capture:
    """Forward pre-hook: the keyword inputs of every call of a module."""

    def __init__(self, module: nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        self.handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.calls.append(dict(kwargs))


# ----------------------------------------------------------------------------------------- facts


def test_facts_read_version_kind_and_rules_from_the_folder(models: dict[str, Path]) -> None:
    import subprocess
    import sys

    from dittune.models.registry import detect_family, facts_class

    facts = facts_class("cogvideox")
    assert issubclass(CogVideoXSpec, facts)
    assert [facts.frame_rule_at(models[v]).multiple for v in VARIANTS] == [4, 8, 4, 8]
    assert [facts.image_conditioning_at(models[v]) for v in VARIANTS] == ["none", "none", "required", "required"]
    assert all(detect_family(models[v]) == "cogvideox" and not facts.check_folder(models[v]) for v in VARIANTS)
    versions = [CogVideoXSpec(models[v]).inspect().version for v in VARIANTS]
    assert versions == ["1.0 T2V", "1.5 T2V", "1.0 I2V", "1.5 I2V"]
    assert [CogVideoXSpec(models[v]).default_fps for v in VARIANTS] == [8.0, 16.0, 8.0, 16.0]
    assert facts.default_fps == 8.0 and facts.default_frames == 49 and CogVideoXSpec(models["1.5"]).default_frames == 9
    assert [CogVideoXSpec(models[v]).sampling_pipeline_class(False) for v in ("1.0", "1.5-i2v")] == [
        "CogVideoXPipeline",
        "CogVideoXImageToVideoPipeline",
    ]
    with pytest.raises(ValueError, match="conditioning image"):
        CogVideoXSpec(models["1.0"]).sampling_pipeline_class(True)
    code = "import sys, dittune.models.registry as r; r.facts_class('cogvideox'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------------------------- text side


def test_prompt_embeddings_match_the_stock_encode_prompt(models: dict[str, Path]) -> None:
    spec = CogVideoXSpec(models["1.0"])
    prompts = [PROMPT, "", "red " * 300]  # the last is truncated to 226 tokens
    ours = spec.encode_prompts(spec.load_text_encoders(CPU, torch.float32), prompts)
    stock = _stock(spec)
    for prompt, embedding in zip(prompts, ours):
        with torch.no_grad():
            embeds, _ = stock.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=226)
        assert embedding["t5_embeds"].shape[0] == 226
        torch.testing.assert_close(embedding["t5_embeds"].unsqueeze(0), embeds, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- objective


def test_training_alphas_are_the_schedulers_shifted_ones(models: dict[str, Path]) -> None:
    """2B's scheduler shifts ᾱ by snr_shift_scale 3 (and rescales it to zero terminal SNR): the ᾱ of training
    is the scheduler's own, not the one the betas give."""
    from dittune.models.diffusion_objective import DDPMTables

    spec = CogVideoXSpec(models["1.0"])
    scheduler = spec.load_scheduler()
    assert scheduler.config.snr_shift_scale == 3.0
    ours = spec.schedule(scheduler, CPU).alphas_cumprod
    assert torch.equal(ours, scheduler.alphas_cumprod.to(torch.float64))
    from_betas = DDPMTables.from_betas(scheduler.betas).alphas_cumprod
    assert (ours - from_betas).abs().max() > 0.1
    assert ours[-1] == 0.0 and from_betas[-1] > 0  # zero terminal SNR
    with pytest.raises(ValueError, match="not the product of its betas"):  # the shared DDPM tables refuse it
        DDPMTables.from_scheduler(scheduler)


class ExactVelocity(nn.Module):
    """A stand-in transformer returning the true velocity (diffusers' `get_velocity`) of the clean latents
    it is given, plus `delta`; it records the timesteps it saw."""

    def __init__(self, scheduler: Any, x0: torch.Tensor, delta: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.scheduler, self.x0, self.delta = scheduler, x0, delta
        self.timesteps: list[int] = []

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **_: Any) -> tuple[torch.Tensor]:
        x_t = hidden_states[:, :, : self.x0.shape[2]].double()
        acp = self.scheduler.alphas_cumprod.double()[timestep].reshape(-1, 1, 1, 1, 1)
        noise = (x_t - acp.sqrt() * self.x0) / (1 - acp).sqrt()
        self.timesteps += timestep.tolist()
        v = self.scheduler.get_velocity(self.x0, noise, timestep)
        return ((v + self.delta).float() + 0 * self.weight,)


@pytest.mark.parametrize("variant", ["1.0", "1.5-i2v"])
def test_x0_is_recovered_from_the_model_velocity_at_every_t(variant: str, models: dict[str, Path]) -> None:
    """x̂0 = √ᾱ·x_t − √(1−ᾱ)·v: the exact velocity gives the clean latents back (zero loss) at low, mid and high t,
    and the 1/(1−ᾱ) weight makes the loss the v-MSE (δ² for an error δ). x0 here is the cached mean ·
    scaling_factor in (B, f, C, h, w), 1.5's padded in front with a copy of the first frame."""
    spec = CogVideoXSpec(models[variant])
    batch = _batch(spec, _encoded(spec, _clip()), size=12)
    scheduler = spec.load_scheduler()
    x0 = batch.moments["mean"].double().permute(0, 2, 1, 3, 4) * spec.scaling_factor
    if variant.startswith("1.5"):
        x0 = torch.cat([x0[:, :1], x0], dim=1)
    settings = LossSettings(sample_latents=False)
    for delta, expected in ((0.0, 0.0), (0.1, 0.01)):
        model = ExactVelocity(scheduler, x0, delta)
        output = spec.compute_loss(model, scheduler, batch, torch.Generator().manual_seed(3), settings)
        assert output.loss.item() == pytest.approx(expected, abs=1e-6)
        assert min(model.timesteps) < 150 and max(model.timesteps) > 850
        assert any(300 < t < 700 for t in model.timesteps)
    assert set(output.logs) == {"loss_mse", "timestep"}
    assert all(value.ndim == 0 and not value.requires_grad for value in output.logs.values())


# ---------------------------------------------------------------- transformer inputs vs the pipeline


@pytest.mark.parametrize("variant", ["1.5", "1.0-i2v", "1.5-i2v"])
def test_training_feeds_the_transformer_as_the_pipeline_does(variant: str, models: dict[str, Path]) -> None:
    """For a 9-frame 64×64 clip the training forward and the stock pipeline give the transformer the same
    hidden states (1.5: 4 latent frames, padded in front; I2V: the image latent at frame 0, zeros after,
    concatenated on channels), the same RoPE and the same `ofs` (2.0 for 1.5 I2V only). The pipeline is fed
    the training's noisy latents and the same image latent (the pipeline's posterior draw)."""
    spec = CogVideoXSpec(models[variant])
    pixels = _clip()
    moments = _encoded(spec, pixels)
    stock = _stock(spec)
    call: dict[str, Any] = {"prompt": PROMPT, "num_frames": 9, "height": 64, "width": 64}
    if spec.is_i2v:
        image = _first_frame_image()
        call["image"] = image
        processed = stock.video_processor.preprocess(image, height=64, width=64).unsqueeze(2)
        with torch.no_grad():
            draw = stock.vae.encode(processed).latent_dist.sample(torch.Generator().manual_seed(7))
        moments.update(image_mean=draw, image_logvar=torch.zeros_like(draw))  # the mean is this draw
    training = Capture(stock.transformer)
    spec.compute_loss(
        stock.transformer,
        stock.scheduler,
        _batch(spec, moments),
        torch.Generator().manual_seed(0),
        LossSettings(sample_latents=False),
    )
    (trained,) = training.calls
    channels = spec.vae_config["latent_channels"]
    noisy = trained["hidden_states"][:, :, :channels]
    inference = Capture(stock.transformer)
    with torch.no_grad():
        latents = stock(
            **call, latents=noisy, num_inference_steps=1, guidance_scale=1.0, output_type="latent",
            generator=torch.Generator().manual_seed(7),
        ).frames  # fmt: skip
    sampled = inference.calls[-1]
    assert noisy.shape[1] == (4 if variant.startswith("1.5") else 3)
    torch.testing.assert_close(trained["hidden_states"], sampled["hidden_states"], rtol=0, atol=0)
    for got, want in zip(trained["image_rotary_emb"], sampled["image_rotary_emb"]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if variant == "1.5-i2v":
        assert trained["ofs"].tolist() == sampled["ofs"].tolist() == [2.0]
    else:
        assert trained["ofs"] is None and sampled.get("ofs") is None  # the T2V pipeline passes no ofs
    assert spec.pipeline_latents(latents, 64, 64, 9).shape[1] == 3
    assert torch.equal(spec.pipeline_latents(latents, 64, 64, 9), latents[:, latents.shape[1] - 3 :])


@pytest.mark.parametrize(
    ("config", "frames", "size"),
    [
        ({"sample_height": 60, "sample_width": 90}, 13, (720, 480)),  # CogVideoX-5B at its size
        ({"sample_height": 60, "sample_width": 90}, 5, (512, 768)),  # portrait: a different crop region
        ({"sample_height": 300, "sample_width": 300, "patch_size_t": 2}, 22, (1360, 768)),  # 1.5, 85 frames padded
        ({"sample_height": 300, "sample_width": 300, "patch_size_t": 2}, 4, (432, 240)),
    ],
)
def test_rope_matches_the_pipeline_for_real_grids(config: dict, frames: int, size: tuple[int, int]) -> None:
    """The released configs' RoPE at sizes the tiny models cannot reach, against the pipeline's own method."""
    from types import SimpleNamespace

    from diffusers import CogVideoXPipeline

    from dittune.models.cogvideox.spec import rotary_embeddings

    config = {"patch_size": 2, "patch_size_t": None, "attention_head_dim": 64, **config}
    config["use_rotary_positional_embeddings"] = True
    shim = SimpleNamespace(vae_scale_factor_spatial=8, transformer=SimpleNamespace(config=SimpleNamespace(**config)))
    width, height = size
    want = CogVideoXPipeline._prepare_rotary_positional_embeddings(shim, height, width, frames, CPU)
    got = rotary_embeddings(config, frames, height // 8, width // 8, CPU)
    assert got is not None
    for ours, theirs in zip(got, want):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_padding_copies_the_first_latent_frame_in_front(models: dict[str, Path]) -> None:
    spec = CogVideoXSpec(models["1.5"])
    latents = torch.randn(2, 3, 4, 8, 8)
    padded = spec.pad_frames(latents)
    assert padded.shape[1] == 4 and torch.equal(padded[:, 0], latents[:, 0]) and torch.equal(padded[:, 1:], latents)
    assert CogVideoXSpec(models["1.0"]).pad_frames(latents) is latents


def test_learned_positions_fix_the_1_0_i2v_size(models: dict[str, Path]) -> None:
    spec = CogVideoXSpec(models["1.0-i2v"])
    moments = _encoded(spec, _clip()[..., :48, :48])
    with pytest.raises(ValueError, match="64×64 only"):
        spec.compute_loss(
            spec.load_denoiser(torch.float32), spec.load_scheduler(), _batch(spec, moments),
            torch.Generator().manual_seed(0), LossSettings(),
        )  # fmt: skip
    assert any("learned positional" in warning for warning in spec.inspect().warnings)


# ------------------------------------------------------------------------- first-frame augmentation


def test_first_frame_noise_is_fixed_by_the_pixels_and_keyed(models: dict[str, Path]) -> None:
    from dittune.fingerprint import Fingerprinter
    from dittune.models.cogvideox.spec import image_noise

    spec = CogVideoXSpec(models["1.5-i2v"])
    vae = spec.load_vae(CPU, torch.float32)
    clip = _clip()
    first, again = spec.encode_pixels(vae, clip), spec.encode_pixels(vae, clip.clone())
    assert first[0]["image_mean"].shape == (4, 1, 8, 8)
    assert torch.equal(first[0]["image_mean"], again[0]["image_mean"])
    assert torch.equal(first[0]["image_logvar"], again[0]["image_logvar"])
    with torch.no_grad():
        clean = vae.encode(clip[:, :, :1]).latent_dist.mean[0]
    assert not torch.equal(first[0]["image_mean"], clean)  # the frame was noised before encoding
    noise = image_noise(clip[0, :, :1])
    assert torch.equal(noise, image_noise(clip[0, :, :1].clone()))
    assert not torch.equal(noise, image_noise(_clip(seed=1)[0, :, :1]))
    assert 0.005 < noise.std().item() < 0.4  # σ = exp(N(−3, 0.5)): within ±4 standard deviations
    fingerprinter = Fingerprinter()
    assert "image_condition" in spec.vae_identity(fingerprinter)
    assert "image_condition" not in CogVideoXSpec(models["1.5"]).vae_identity(fingerprinter)


# ------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("variant", ["1.0", "1.5-i2v"])
def test_sampling_from_cached_embeddings_matches_the_stock_pipeline(variant: str, models: dict[str, Path]) -> None:
    spec = CogVideoXSpec(models[variant])
    image = _first_frame_image() if spec.is_i2v else None
    positive, negative = spec.encode_prompts(spec.load_text_encoders(CPU, torch.float32), [PROMPT, NEGATIVE])
    pipeline = spec.build_pipeline(
        spec.load_denoiser(torch.float32), spec.load_vae(CPU, torch.float32), spec.load_scheduler(), spec.is_i2v
    )
    size: dict[str, Any] = {"width": 64, "height": 64, "frames": 9, "image": image}
    ours = pipeline(
        **spec.pipeline_kwargs(
            positive, negative, steps=2, guidance=6.0, generator=torch.Generator().manual_seed(0), **size
        )
    )
    stock = _stock(spec)(
        **spec.prompt_kwargs(PROMPT, NEGATIVE, **size),
        num_inference_steps=2,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(0),
    )
    got, want = spec.output_frames(ours), spec.output_frames(stock)
    assert len(got) == len(want) == 9 and got[0].size == (64, 64)
    for frame, reference in zip(got, want):
        assert np.array_equal(np.asarray(frame), np.asarray(reference))
