"""LTX-Video's spec checked against diffusers' LTX pipelines on a tiny model: prompt encoding, latent
normalisation and packing, the training shift, the flow forward, first-frame conditioning and sampling
from cached embeddings (text-to-video and image-to-video)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from dittune.models.base import LossSettings, SampleMeta, TrainBatch
from dittune.models.facts import FrameRule
from dittune.models.ltx_video.spec import LTXVideoSpec, pack_latents, unpack_latents

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red ball rolling to the right", "", "blue " * 200]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dittune.models.registry import tiny_builder

    return tiny_builder("ltx-video")(tmp_path_factory.mktemp("ltx") / "model", seed=0)


@pytest.fixture(scope="module")
def spec(model: Path) -> LTXVideoSpec:
    return LTXVideoSpec(model)


@pytest.fixture(scope="module")
def texts(spec: LTXVideoSpec) -> list[dict[str, torch.Tensor]]:
    return spec.encode_prompts(spec.load_text_encoders(CPU, torch.float32), PROMPTS)


def _batched(entries: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([e[key] for e in entries]) for key in entries[0]}


def _clips(count: int, frames: int = 9, side: int = 64) -> torch.Tensor:
    return torch.rand(count, 3, frames, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1


class ExactVelocity:
    """Stands in for the transformer's forward: reads σ from the timestep it gets and returns the true velocity
    (x_t − x0) / σ of every token, plus `offset` on the first `tokens` tokens; records its arguments."""

    def __init__(self, x0: torch.Tensor, offset: float = 0.0, tokens: int = 0) -> None:
        self.x0_tokens, self.offset, self.tokens, self.calls = pack_latents(x0), offset, tokens, []

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor]:
        self.calls.append({"hidden_states": hidden_states, "timestep": timestep, **kwargs})
        sigma = (timestep / 1000.0).reshape(timestep.shape[0], -1, 1)
        velocity = (hidden_states - self.x0_tokens) / sigma.clamp_min(1e-12)  # 0 where x_t is x0
        velocity[:, : self.tokens] += self.offset
        return (velocity,)


def test_facts_and_folder(spec: LTXVideoSpec, model: Path) -> None:
    """The torch-free facts are the spec's base; the tiny folder passes the checks and has LTX's geometry."""
    import subprocess
    import sys

    from dittune.models.registry import facts_class

    assert issubclass(LTXVideoSpec, facts_class("ltx-video"))
    code = "import sys, dittune.models.registry as r; r.facts_class('ltx-video'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert spec.check_folder(model) == [] and spec.frame_rule_at(model) == FrameRule(8)
    assert spec.compression == (32, 8) and spec.alignment == 32 and spec.takes_image and not spec.needs_image
    info = spec.inspect()
    assert info.warnings == [] and info.summary["t5_max_length"] == 128
    denoiser = spec.load_denoiser(torch.float32)
    targets = [n for n, _ in denoiser.named_modules() if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")]
    assert len(targets) == 2 * 2 * 3  # attn1 and attn2 in both blocks
    assert len(spec.transformer_blocks(denoiser)) == 2


def test_prompt_embeddings_match_the_stock_encode_prompt(spec: LTXVideoSpec, model: Path, texts) -> None:
    """Embeddings and attention mask as `LTXPipeline.encode_prompt` (empty and over-long prompts included)."""
    from diffusers import LTXPipeline

    stock = LTXPipeline.from_pretrained(model)
    for prompt, embedding in zip(PROMPTS, texts):
        with torch.no_grad():
            embeds, mask, _, _ = stock.encode_prompt(prompt, do_classifier_free_guidance=False)
        torch.testing.assert_close(embedding["t5_embeds"].unsqueeze(0), embeds, rtol=0, atol=0)
        assert torch.equal(embedding["t5_mask"].unsqueeze(0), mask) and mask.shape == (1, 128)
    assert [int(t["t5_mask"].sum()) for t in texts[1:]] == [1, 128]  # "" is just </s>; the long one is truncated


def test_packing_matches_the_pipeline() -> None:
    from diffusers import LTXPipeline

    latents = torch.randn(2, 8, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert torch.equal(packed, LTXPipeline._pack_latents(latents))
    assert torch.equal(unpack_latents(packed, 3, 4, 6), latents)
    assert torch.equal(LTXPipeline._unpack_latents(packed, 3, 4, 6), latents)
    patched = pack_latents(latents[:, :, :2], patch=2, patch_t=2)
    assert patched.shape == (2, 1 * 2 * 3, 8 * 8) and torch.equal(
        unpack_latents(patched, 2, 4, 6, 2, 2), latents[:, :, :2]
    )


def test_latents_are_normalised_with_the_vae_buffers(spec: LTXVideoSpec) -> None:
    """Moments → x0 equals the pipeline's `_normalize_latents` of the posterior (mean, or the same draw)."""
    from diffusers import LTXPipeline
    from diffusers.pipelines.ltx.pipeline_ltx_image2video import retrieve_latents

    vae = spec.load_vae(CPU, torch.float32)
    assert not torch.equal(vae.latents_mean, torch.zeros(8)) and not torch.equal(vae.latents_std, torch.ones(8))
    pixels = _clips(2)
    moments = spec.encode_pixels(vae, pixels)
    assert moments[0]["mean"].shape == (8, 2, 2, 2) and moments[0]["logvar"].shape == (1, 2, 2, 2)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        drawn = retrieve_latents(vae.encode(pixels), torch.Generator().manual_seed(3))

    def normalise(z: torch.Tensor) -> torch.Tensor:
        return LTXPipeline._normalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)

    stacked = _batched(moments)
    ours = spec.latents_from_moments(stacked, torch.Generator().manual_seed(0), sample=False)
    torch.testing.assert_close(ours, normalise(posterior.mean), rtol=0, atol=0)
    ours = spec.latents_from_moments(stacked, torch.Generator().manual_seed(3), sample=True)
    torch.testing.assert_close(ours, normalise(drawn), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 0.95])
def test_forward_turns_the_exact_velocity_back_into_x0(spec: LTXVideoSpec, texts, sigma: float, monkeypatch) -> None:
    """With the transformer answering the true velocity for what it is given (packed x_t, timestep 1000·σ),
    x0 = x_σ − σ·v recovers x0; the latent grid and per-clip RoPE frame rates reach the transformer."""
    from dittune.models import flow_objective as flow

    denoiser = spec.load_denoiser(torch.float32)
    generator = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(2, 8, 3, 2, 4, generator=generator) for _ in range(2))
    sigmas = torch.tensor([sigma, sigma])
    x_t = flow.noisy_latents(x0, noise, sigmas)
    fake = ExactVelocity(x0)
    monkeypatch.setattr(denoiser, "forward", fake)
    text = _batched(texts[:2])
    v = spec.forward(denoiser, x_t, sigmas, text, fps=[25.0, 8.0])
    torch.testing.assert_close(flow.x0_from_velocity(x_t, v, sigmas), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v, noise - x0, rtol=1e-3, atol=1e-3)
    call = fake.calls[0]
    assert (call["num_frames"], call["height"], call["width"]) == (3, 2, 4)
    assert torch.equal(call["timestep"], sigmas * 1000.0) and torch.equal(
        call["encoder_attention_mask"], text["t5_mask"]
    )
    scale = call["rope_interpolation_scale"]
    assert scale[1:] == (32, 32) and scale[0].flatten().tolist() == pytest.approx([8 / 25, 1.0])
    spec.forward(denoiser, x_t, sigmas, text, fps=[25.0, 25.0])
    assert fake.calls[1]["rope_interpolation_scale"] == (8 / 25, 32, 32)  # one rate: the pipeline's plain tuple


def test_clips_at_different_frame_rates_each_get_their_own_rope(spec: LTXVideoSpec, texts) -> None:
    """A batch mixing frame rates gives each clip what the transformer computes for it alone at its rate."""
    denoiser = spec.load_denoiser(torch.float32)
    x_t = torch.randn(2, 8, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    sigmas, text = torch.tensor([0.3, 0.6]), _batched(texts[:2])
    with torch.no_grad():
        mixed = spec.forward(denoiser, x_t, sigmas, text, fps=[25.0, 8.0])
        alone = [
            spec.forward(denoiser, x_t[i : i + 1], sigmas[i : i + 1], {k: v[i : i + 1] for k, v in text.items()}, [r])
            for i, r in enumerate((25.0, 8.0))
        ]
        swapped = spec.forward(denoiser, x_t, sigmas, text, fps=[8.0, 25.0])
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mixed, swapped, atol=1e-5)


def test_training_shift_is_the_pipeline_shift(spec: LTXVideoSpec, texts, monkeypatch) -> None:
    """ "shift" sampling shifts σ by exp(μ) of `calculate_shift` for the clip's latent token count."""
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    from dittune.models import flow_objective as flow

    scfg = spec.scheduler_config
    for grid in [(2, 2, 2), (7, 16, 24), (13, 16, 24)]:  # 9×64², 49×512×768, 97×512×768
        mu = calculate_shift(
            math.prod(grid),
            scfg["base_image_seq_len"],
            scfg["max_image_seq_len"],
            scfg["base_shift"],
            scfg["max_shift"],
        )
        assert spec.sampling_shift(LossSettings(timestep_sampling="shift"), *grid) == pytest.approx(math.exp(mu))
    assert spec.sampling_shift(LossSettings(timestep_sampling="logit_normal"), 2, 2, 2) is None
    assert spec.sampling_shift(LossSettings(timestep_sampling="logit_normal", flow_shift=3.0), 2, 2, 2) == 3.0
    assert spec.default_loss_settings("lora").timestep_sampling == "shift"

    shifts = []
    draw = flow.training_draw
    monkeypatch.setattr(flow, "training_draw", lambda x0, s, g, shift: shifts.append(shift) or draw(x0, s, g, shift))
    batch, x0 = _batch(spec, texts, frames=9)
    denoiser = spec.load_denoiser(torch.float32)
    monkeypatch.setattr(denoiser, "forward", ExactVelocity(x0))
    spec.compute_loss(denoiser, None, batch, torch.Generator().manual_seed(0), spec.default_loss_settings("lora"))
    assert shifts == [pytest.approx(spec.sampling_shift(LossSettings(timestep_sampling="shift"), 2, 2, 2))]


def _batch(spec: LTXVideoSpec, texts, frames: int) -> tuple[TrainBatch, torch.Tensor]:
    """Two cached clips of `frames` frames at 64×64 (8 and 24 fps) and their clean latents (posterior mean)."""
    moments = _batched(spec.encode_pixels(spec.load_vae(CPU, torch.float32), _clips(2, frames)))
    meta = [SampleMeta((64, 64), (64, 64), (0, 0), frames=frames, fps=rate) for rate in (8.0, 24.0)]
    batch = TrainBatch(moments=moments, text=_batched(texts[:2]), meta=meta)
    return batch, spec.latents_from_moments(moments, torch.Generator(), sample=False)


@pytest.mark.parametrize("p", [1.0, 0.0])
def test_first_frame_conditioning(spec: LTXVideoSpec, texts, p: float, monkeypatch) -> None:
    """p = 1: the first latent frame of x_t is x0's, its tokens get timestep 0 and the loss ignores them;
    p = 0: the whole clip is noised and every frame counts."""
    batch, x0 = _batch(spec, texts, frames=9)
    denoiser = spec.load_denoiser(torch.float32)
    settings = LossSettings(timestep_sampling="shift", first_frame_p=p, sample_latents=False)
    first, losses = 2 * 2, []  # tokens of the first latent frame (2×2 latent pixels)
    for offset in (0.0, 5.0):  # the model's answer on the first frame's tokens, exact or wrong
        fake = ExactVelocity(x0, offset, first)
        monkeypatch.setattr(denoiser, "forward", fake)
        out = spec.compute_loss(denoiser, None, batch, torch.Generator().manual_seed(0), settings)
        losses.append(out.loss)
    assert set(out.logs) == {"loss_mse", "sigma_mean"}
    assert all(v.ndim == 0 and not v.requires_grad for v in out.logs.values())
    call, x0_tokens = fake.calls[0], pack_latents(x0)
    assert losses[0] < 1e-8
    if p == 1.0:
        assert torch.equal(call["hidden_states"][:, :first], x0_tokens[:, :first])
        assert not torch.allclose(call["hidden_states"][:, first:], x0_tokens[:, first:])
        timestep = call["timestep"]
        assert timestep.shape == (2, 8) and not timestep[:, :first].any() and timestep[:, first:].min() > 0
        assert torch.equal(timestep[:, first:], timestep[:, -1:].expand(-1, 4))  # the clip's 1000·σ
        assert losses[1] == losses[0]
    else:
        assert call["timestep"].shape == (2,)
        assert not torch.allclose(call["hidden_states"][:, :first], x0_tokens[:, :first])
        assert losses[1] > 1.0


def test_a_mixed_batch_conditions_only_its_drawn_clips(spec: LTXVideoSpec, texts, monkeypatch) -> None:
    """Per-token timesteps: 0 on the first latent frame of the conditioned clip only."""
    denoiser = spec.load_denoiser(torch.float32)
    x0 = torch.randn(2, 8, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    fake = ExactVelocity(x0)
    monkeypatch.setattr(denoiser, "forward", fake)
    sigmas = torch.tensor([0.25, 0.75])
    spec.forward(denoiser, x0, sigmas, _batched(texts[:2]), [25.0, 25.0], torch.tensor([True, False]))
    expected = torch.tensor([[0.0] * 4 + [250.0] * 4, [750.0] * 8])
    assert torch.equal(fake.calls[0]["timestep"], expected)


def test_a_single_latent_frame_is_never_conditioned(spec: LTXVideoSpec, texts, monkeypatch) -> None:
    batch, x0 = _batch(spec, texts, frames=1)
    denoiser = spec.load_denoiser(torch.float32)
    fake = ExactVelocity(x0, offset=5.0, tokens=2 * 2)
    monkeypatch.setattr(denoiser, "forward", fake)
    settings = LossSettings(first_frame_p=1.0, sample_latents=False)
    out = spec.compute_loss(denoiser, None, batch, torch.Generator(), settings)
    assert fake.calls[0]["timestep"].shape == (2,) and out.loss > 1.0  # a still: its only frame is trained


def test_conditioning_frame_is_left_out_of_the_loss() -> None:
    """The masked loss is the mean over the noised frames: changing the conditioning frame's prediction
    changes nothing; changing it without conditioning does."""
    generator = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(2, 4, 3, 2, 2, generator=generator) for _ in range(2))
    prediction = noise - x0 + 0.1 * torch.randn(x0.shape, generator=generator)
    sigmas, changed = torch.tensor([0.3, 0.7]), prediction.clone()
    changed[:, :, 0] += 10.0
    on, off = torch.tensor([True, True]), torch.tensor([False, False])
    loss = LTXVideoSpec.masked_loss
    assert loss(changed, x0, noise, sigmas, on)[0] == loss(prediction, x0, noise, sigmas, on)[0]
    assert loss(changed, x0, noise, sigmas, off)[0] > loss(prediction, x0, noise, sigmas, off)[0] + 1.0
    expected = (prediction - (noise - x0))[:, :, 1:].square().mean()
    torch.testing.assert_close(loss(prediction, x0, noise, sigmas, on)[0], expected)


def _image():
    from PIL import Image

    return Image.new("RGB", (64, 64), (200, 40, 40))


@pytest.mark.parametrize("conditioned", [False, True])
def test_sampling_from_cached_embeddings_matches_the_stock_pipeline(spec: LTXVideoSpec, texts, conditioned) -> None:
    """`build_pipeline` + `pipeline_kwargs` (cached embeddings) give the stock pipeline's frames for the prompt
    text, text-to-video (LTXPipeline) and image-to-video (LTXImageToVideoPipeline); the latent output unpacks."""
    image = _image() if conditioned else None
    geometry: dict[str, Any] = {"width": 64, "height": 64, "frames": 9, "fps": 8.0, "image": image}
    ours = spec.build_pipeline(
        spec.load_denoiser(torch.float32), spec.load_vae(CPU, torch.float32), spec.load_scheduler(), conditioned
    )
    stock = spec.load_pipeline(torch.float32, conditioned=conditioned)
    name = "LTXImageToVideoPipeline" if conditioned else "LTXPipeline"
    assert type(ours).__name__ == type(stock).__name__ == name
    kwargs = spec.pipeline_kwargs(
        texts[0], texts[1], steps=2, guidance=3.0, generator=torch.Generator().manual_seed(0), **geometry
    )
    frames = ours(**kwargs, output_type="np").frames
    prompt_kwargs = spec.prompt_kwargs(PROMPTS[0], PROMPTS[1], **geometry)
    expected = stock(
        **prompt_kwargs,
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames
    assert frames.shape == (1, 9, 64, 64, 3)
    torch.testing.assert_close(torch.as_tensor(frames), torch.as_tensor(expected), rtol=0, atol=1e-6)

    kwargs["generator"] = torch.Generator().manual_seed(0)
    packed = ours(**kwargs, output_type="latent").frames
    latents = spec.pipeline_latents(packed, 64, 64, 9)
    assert packed.shape == (1, 8, 8) and latents.shape == (1, 8, 2, 2, 2)
    assert torch.equal(pack_latents(latents), packed)
    if not conditioned:
        kwargs["generator"] = torch.Generator().manual_seed(0)
        pil = spec.output_frames(ours(**kwargs))
        assert len(pil) == 9 and pil[0].size == (64, 64)
