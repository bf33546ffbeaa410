"""Wan (2.1 T2V and the 2.2 TI2V-5B layout) against diffusers itself, on tiny models: prompt encoding, latent
normalisation, the flow convention and the inputs the transformer gets, LoRA targets and sampling from cached
embeddings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dittune.models.base import LossSettings, SampleMeta, TrainBatch
from dittune.models.facts import FrameRule
from dittune.models.wan.spec import WanSpec
from dittune.models.wan.tiny import build_tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red ball rolling to the right", "", "blue " * 600, "  a  &amp; b\n\tred  "]
"""Plain, empty, over-long (truncated to 512 tokens) and one the pipeline's cleaning changes."""
CPU = torch.device("cpu")
SIDE, FRAMES = 64, 9


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan")
    return {variant: build_tiny_wan(root / variant, variant, seed=0) for variant in ("2.1", "2.2")}


@pytest.fixture(scope="module")
def spec(models: dict[str, Path]) -> WanSpec:
    return WanSpec(models["2.1"])


def _stock(path: Path):
    from diffusers import WanPipeline

    pipeline = WanPipeline.from_pretrained(path)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def stock(models: dict[str, Path]):
    return _stock(models["2.1"])


@pytest.fixture(scope="module")
def embeddings(spec: WanSpec) -> list[dict[str, torch.Tensor]]:
    return spec.encode_prompts(spec.load_text_encoders(CPU, torch.float32), PROMPTS)


def _batched(*entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([e[key] for e in entries]) for key in entries[0]}


def _clips(count: int, frames: int = FRAMES) -> torch.Tensor:
    return torch.rand(count, 3, frames, SIDE, SIDE, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _declared(spec: WanSpec) -> tuple:
    return spec.alignment, spec.default_frames, spec.default_fps, spec.default_size(None)


def test_facts_need_no_torch_and_describe_both_layouts(spec: WanSpec, models: dict[str, Path]) -> None:
    """Wan 2.1 has the class's declarations; a TI2V-5B folder its own (read from its configs)."""
    code = "import sys, dittune.models.wan.facts; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    assert spec.check_folder(spec.path) == [] and spec.frame_rule_at(spec.path) == FrameRule(4)
    assert _declared(spec) == (16, 81, 16.0, (832, 480))
    info = spec.inspect()
    assert info.version == "2.1" and info.warnings == []
    assert info.summary["vae"] == "×8 spatial, ×4 temporal, 4 channels"
    assert "shifted by 3," in spec.describe_objective(spec.default_loss_settings("lora"))
    assert len(spec.transformer_blocks(spec.load_denoiser(torch.float32, random_init=True))) == 2
    ti2v = WanSpec(models["2.2"])
    assert ti2v.check_folder(ti2v.path) == [] and ti2v.inspect().version == "2.2 TI2V-5B"
    assert _declared(ti2v) == (32, 121, 24.0, (1280, 704)) and WanSpec.alignment_at(ti2v.path) == 32
    assert ti2v.frame_rule_at(ti2v.path) == FrameRule(4)
    described = ti2v.describe_objective(ti2v.default_loss_settings("lora"))
    assert described.endswith("shifted by 5, weighting none, timestep per token (TI2V)")
    assert (WanSpec.alignment, WanSpec.default_frames) == (16, 81)  # the instance values do not leak


def test_a_half_declared_two_expert_folder_is_refused(spec: WanSpec, tmp_path: Path) -> None:
    """A Wan 2.2 A14B folder needs both experts and the boundary between them (tests/test_wan_a14b.py trains one);
    a model_index.json with only one of them is named as such, before anything loads."""
    folder = tmp_path / "a14b"
    shutil.copytree(spec.path, folder)
    shutil.copytree(spec.path / "transformer", folder / "transformer_2")
    index = json.loads((folder / "model_index.json").read_text())
    halves = [
        ({"boundary_ratio": 0.875}, "no transformer_2"),
        ({"transformer_2": ["diffusers", "WanTransformer3DModel"]}, "boundary_ratio is None"),
    ]
    for declared, message in halves:
        (folder / "model_index.json").write_text(json.dumps({**index, **declared}))
        (problem,) = WanSpec.check_folder(folder)
        assert "A14B" in problem and message in problem
        assert set(WanSpec.experts_at(folder)) == {"high_noise", "low_noise"}
        with pytest.raises(ValueError, match=message):
            WanSpec(folder, expert="high_noise").inspect()


def test_prompt_embeddings_match_the_stock_encode_prompt(spec: WanSpec, stock, embeddings) -> None:
    """The cached states equal `encode_prompt` at the pipeline's 512 tokens: cleaned, masked, zero after the
    prompt's own tokens (batched here, one by one there)."""
    for prompt, embedding in zip(PROMPTS, embeddings):
        with torch.no_grad():
            embeds, _ = stock.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512)
        assert embeds.shape == (1, 512, 32)
        torch.testing.assert_close(embedding["t5_embeds"].unsqueeze(0), embeds, rtol=0, atol=0)
    lengths = [int(e["t5_embeds"].abs().sum(dim=1).gt(0).sum()) for e in embeddings]
    assert lengths[1] == 1 and lengths[2] == 512 and 1 < lengths[0] < 20  # "" is </s>; the long one is cut
    assert torch.equal(embeddings[3]["t5_embeds"], spec.encode_prompts(_encoders(spec), ["a & b red"])[0]["t5_embeds"])


def _encoders(spec: WanSpec):
    return spec.load_text_encoders(CPU, torch.float32)


def test_latents_are_normalised_as_the_pipeline_denormalises(spec: WanSpec) -> None:
    """x0 = (z − mean) · (1/std) with the VAE config's lists; the pipeline's pre-decode step
    (``latents / (1/std) + mean``) turns it back into z. A draw uses the posterior's own sampling."""
    from diffusers.pipelines.wan.pipeline_wan_video2video import retrieve_latents

    vae = spec.load_vae(CPU, torch.float32)
    pixels = _clips(2)
    moments = spec.encode_pixels(vae, pixels)
    assert moments[0]["mean"].shape == (4, 3, 8, 8) == moments[0]["logvar"].shape
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        drawn = retrieve_latents(vae.encode(pixels), torch.Generator().manual_seed(3))
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    assert not torch.equal(mean, torch.zeros_like(mean)) and not torch.equal(inverse_std, torch.ones_like(mean))
    stacked = _batched(*moments)
    x0 = spec.latents_from_moments(stacked, torch.Generator().manual_seed(0), sample=False)
    torch.testing.assert_close(x0, (posterior.mode() - mean) * inverse_std, rtol=0, atol=0)
    torch.testing.assert_close(x0 / inverse_std + mean, posterior.mean, rtol=1e-6, atol=1e-6)
    x0 = spec.latents_from_moments(stacked, torch.Generator().manual_seed(3), sample=True)
    torch.testing.assert_close(x0, (drawn - mean) * inverse_std, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="4k\\+1"):
        spec.encode_pixels(vae, pixels[:, :, :8])


class ExactVelocity(torch.nn.Module):
    """Stands in for the transformer: returns noise − x0 = (x_σ − x0)/σ, reading σ from `timestep`/1000."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x0 = x0
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **kwargs) -> tuple[torch.Tensor]:
        self.calls.append({"timestep": timestep, **kwargs})
        sigma = (timestep[:, :1] if timestep.ndim == 2 else timestep).reshape(-1, 1, 1, 1, 1) / 1000.0
        return ((hidden_states - self.x0) / sigma,)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 0.95])
def test_x0_is_recovered_from_the_exact_velocity(spec: WanSpec, embeddings, sigma: float) -> None:
    from dittune.models import flow_objective as flow

    generator = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(2, 4, 3, 8, 8, generator=generator) for _ in range(2))
    sigmas = torch.tensor([sigma, sigma])
    x_t = flow.noisy_latents(x0, noise, sigmas)
    fake = ExactVelocity(x0)
    velocity = spec.forward(fake, x_t, sigmas, _batched(*embeddings[:2]))
    torch.testing.assert_close(velocity, noise - x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(flow.x0_from_velocity(x_t, velocity, sigmas), x0, rtol=1e-5, atol=1e-5)
    assert torch.equal(fake.calls[0]["timestep"], sigmas * 1000.0)
    assert torch.equal(fake.calls[0]["encoder_hidden_states"], _batched(*embeddings[:2])["t5_embeds"])


def test_the_training_loss_vanishes_for_the_exact_velocity(spec: WanSpec, embeddings) -> None:
    """compute_loss normalises the cached latents, draws σ uniformly shifted by the scheduler's 3.0 and targets
    noise − x0."""
    from dittune.models import flow_objective as flow

    moments = _batched(*spec.encode_pixels(spec.load_vae(CPU, torch.float32), _clips(2)))
    x0 = spec.latents_from_moments(moments, torch.Generator(), sample=False)
    denoiser = ExactVelocity(x0)
    meta = [SampleMeta((SIDE, SIDE), (SIDE, SIDE), (0, 0), frames=FRAMES, fps=16.0)] * 2
    batch = TrainBatch(moments=moments, text=_batched(*embeddings[:2]), meta=meta)
    settings = spec.default_loss_settings("lora")
    settings.sample_latents = False
    out = spec.compute_loss(denoiser, spec.load_scheduler(), batch, torch.Generator().manual_seed(2), settings)
    assert out.loss.item() < 1e-8 and set(out.logs) == {"loss_mse", "sigma_mean"}
    assert all(v.ndim == 0 and not v.requires_grad for v in out.logs.values())
    expected = flow.shift_sigmas(torch.rand(2, generator=torch.Generator().manual_seed(2)), 3.0)
    torch.testing.assert_close(denoiser.calls[0]["timestep"], expected * 1000.0)
    assert spec.sampling_shift(LossSettings(timestep_sampling="logit_normal")) is None
    assert spec.sampling_shift(LossSettings(timestep_sampling="logit_normal", flow_shift=5.0)) == 5.0


@pytest.mark.parametrize("variant", ["2.1", "2.2"])
def test_training_feeds_the_transformer_what_the_pipeline_feeds_it(variant: str, models, embeddings) -> None:
    """With the pipeline's first-step latents and σ, the spec's forward gives the transformer the same inputs
    (a timestep per latent token for TI2V) and reproduces its output."""
    spec = WanSpec(models[variant])
    encoded = spec.encode_prompts(_encoders(spec), PROMPTS[:2]) if variant != "2.1" else embeddings[:2]
    denoiser = spec.load_denoiser(torch.float32)
    seen: list[tuple[dict, torch.Tensor]] = []
    denoiser.register_forward_hook(lambda _m, _a, kwargs, out: seen.append((kwargs, out[0])), with_kwargs=True)
    pipeline = spec.build_pipeline(denoiser, spec.load_vae(CPU, torch.float32), spec.load_scheduler())
    kwargs = spec.pipeline_kwargs(
        encoded[0], encoded[1], width=SIDE, height=SIDE, steps=2, guidance=1.0,
        generator=torch.Generator().manual_seed(0), frames=FRAMES,
    )  # fmt: skip
    pipeline(**kwargs, output_type="latent")
    stock_inputs, stock_output = seen[-1]  # the second step: σ < 1
    timestep = stock_inputs["timestep"]
    sigmas = (timestep[:, 0] if timestep.ndim == 2 else timestep).float() / 1000.0
    with torch.no_grad():
        ours = spec.forward(denoiser, stock_inputs["hidden_states"], sigmas, _batched(encoded[0]))
    train_inputs = seen[-1][0]
    assert torch.equal(train_inputs["timestep"], stock_inputs["timestep"].float())
    assert train_inputs["timestep"].shape == ((1, 3 * 2 * 2) if variant == "2.2" else (1,))
    assert torch.equal(train_inputs["encoder_hidden_states"], stock_inputs["encoder_hidden_states"])
    torch.testing.assert_close(ours, stock_output, rtol=0, atol=0)


def test_a_lora_with_the_default_targets_loads_into_the_stock_pipeline(spec: WanSpec, stock, tmp_path) -> None:
    """The default targets are the self- and cross-attention projections of every block, and diffusers' loader
    takes our file as trained (alpha ≠ rank)."""
    from dittune.export.lora_file import LoraInfo, save_lora
    from dittune.models.lora import inject_lora, lora_state_dict

    denoiser = spec.load_denoiser(torch.float32)
    names = inject_lora(denoiser, rank=2, alpha=4.0, targets=spec.default_lora_targets)
    expected = {f"blocks.{b}.{a}.{p}" for b in (0, 1) for a in ("attn1", "attn2") for p in spec.default_lora_targets}
    assert set(names) == expected
    generator = torch.Generator().manual_seed(3)
    for name, param in denoiser.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    info = LoraInfo("wan", "transformer", 2, 4.0, list(spec.default_lora_targets))
    stock.load_lora_weights(str(save_lora(tmp_path / "lora.safetensors", lora_state_dict(denoiser), info)))
    inputs = {
        "hidden_states": torch.randn(1, 4, 3, 8, 8, generator=generator),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 512, 32, generator=generator),
        "return_dict": False,
    }
    try:
        with torch.no_grad():
            torch.testing.assert_close(stock.transformer(**inputs)[0], denoiser(**inputs)[0])
            stock.disable_lora()
            assert not torch.allclose(stock.transformer(**inputs)[0], denoiser(**inputs)[0], atol=1e-4)
    finally:
        stock.unload_lora_weights()


@pytest.mark.parametrize("variant", ["2.1", "2.2"])
def test_sampling_from_cached_embeddings_equals_the_stock_pipeline(variant: str, models, spec, embeddings) -> None:
    """9 frames at 64×64, 2 steps with guidance: the validation path (cached embeddings) and the text path agree."""
    if variant != "2.1":
        spec = WanSpec(models[variant])
        embeddings = spec.encode_prompts(_encoders(spec), PROMPTS[:2])
    pipeline = spec.build_pipeline(
        spec.load_denoiser(torch.float32), spec.load_vae(CPU, torch.float32), spec.load_scheduler()
    )
    common = {"width": SIDE, "height": SIDE, "frames": FRAMES, "fps": spec.default_fps}
    ours = pipeline(
        **spec.pipeline_kwargs(
            embeddings[0], embeddings[1], steps=2, guidance=4.0, generator=torch.Generator().manual_seed(0), **common
        ),
        output_type="np",
    ).frames
    reference = _stock(models[variant])(
        **spec.prompt_kwargs(PROMPTS[0], PROMPTS[1], **common),
        num_inference_steps=2,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames
    assert ours.shape == (1, FRAMES, SIDE, SIDE, 3)
    assert torch.equal(torch.from_numpy(ours), torch.from_numpy(reference))
    latents = pipeline(
        **spec.pipeline_kwargs(
            embeddings[0], embeddings[1], steps=1, guidance=1.0, generator=torch.Generator().manual_seed(0), **common
        ),
        output_type="latent",
    ).frames
    latent_side = SIDE // spec.alignment * 2
    assert spec.pipeline_latents(latents, SIDE, SIDE, FRAMES).shape == (1, 4, 3, latent_side, latent_side)


def test_the_tiny_build_is_deterministic(models: dict[str, Path], tmp_path: Path) -> None:
    again = build_tiny_wan(tmp_path / "again", "2.1", seed=0)
    for part in ("transformer/diffusion_pytorch_model.safetensors", "vae/config.json", "tokenizer/tokenizer.json"):
        assert (again / part).read_bytes() == (models["2.1"] / part).read_bytes(), part
    with pytest.raises(ValueError, match="unknown variant"):
        build_tiny_wan(tmp_path / "nope", "2.3")
