"""Per-family pieces checked against diffusers itself: prompt encoding, latent packing, shifts,
micro-conditions, and sizes in pixels and megapixels snapped to each family's alignment."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import FAMILIES
from dittune.data.buckets import MEGAPIXEL, bucket_sizes, square_bucket
from dittune.models.registry import spec_class

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle on a blue background", ""]


def _stock(family: str, model: Path):
    import diffusers

    pipeline = getattr(diffusers, spec_class(family).pipeline_class).from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("family", FAMILIES)
def test_facts_are_the_spec_declarations_and_need_no_torch(family: str) -> None:
    """Preflight reads a family's torch-free facts; the spec class is built on exactly those."""
    import subprocess
    import sys

    from dittune.models.registry import facts_class

    facts, spec = facts_class(family), spec_class(family)
    assert issubclass(spec, facts) and spec.family == facts.family == family
    for name in ("alignment", "text_encoders", "default_lora_targets", "loss_options", "t5_lengths", "pipeline_class"):
        assert getattr(spec, name) == getattr(facts, name), name
    code = f"import sys, dittune.models.registry as r; r.facts_class({family!r}); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("resolution", "kind"), [(0.25, "area"), (0.5, "area"), (1.0, "area"), (72, "pixel")])
def test_sizes_snap_to_the_family_alignment(family: str, resolution: float, kind: str) -> None:
    alignment = spec_class(family).alignment
    sizes = bucket_sizes(resolution, kind, alignment, alignment * max(1, 64 // alignment), 2.0)
    assert all(w % alignment == 0 and h % alignment == 0 for w, h in sizes)
    side, _ = square_bucket(resolution, kind, alignment)
    if kind == "area":
        target = resolution * MEGAPIXEL
        assert abs(side * side - target) / target < 0.15  # 0.25 MP ≈ 512², 1.0 MP = 1024²
        assert all(abs(w * h - target) / target < 0.25 for w, h in sizes)
    else:
        assert side == max(alignment, math.floor(72 / alignment + 0.5) * alignment)  # halves round up
        assert all(min(w, h) == side for w, h in sizes)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(512, 512), (96, 160)])
def test_the_family_pipeline_samples_at_snapped_sizes(family: str, size: tuple[int, int], family_models) -> None:
    """0.25 MP and a non-square pixel size, snapped: the stock pipeline around the spec's parts accepts them."""
    from dittune.data.buckets import snap

    spec = spec_class(family)(family_models[family])
    alignment = spec.alignment
    width, height = (snap(v, alignment) for v in size)
    encoders = spec.load_text_encoders(torch.device("cpu"), torch.float32)
    positive, negative = spec.encode_prompts(encoders, [PROMPTS[0], "blurry"])
    pipeline = spec.build_pipeline(
        spec.load_denoiser(torch.float32), spec.load_vae(torch.device("cpu"), torch.float32), spec.load_scheduler()
    )
    kwargs = spec.pipeline_kwargs(
        positive,
        negative,
        width=width,
        height=height,
        steps=1,
        guidance=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    image = pipeline(**kwargs).images[0]
    assert image.size == (width, height)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "hunyuan-dit"])
def test_prompt_embeddings_match_the_stock_encode_prompt(family: str, family_models) -> None:
    model = family_models[family]
    spec = spec_class(family)(model)
    ours = spec.encode_prompts(spec.load_text_encoders(torch.device("cpu"), torch.float32), PROMPTS)
    stock = _stock(family, model)
    for prompt, embedding in zip(PROMPTS, ours):
        batch = {k: v.unsqueeze(0) for k, v in embedding.items()}
        with torch.no_grad():
            if family == "sd3":
                embeds, _, pooled, _ = stock.encode_prompt(prompt, None, None, do_classifier_free_guidance=False)
                got_embeds, got_pooled = spec.joint_text(batch)
                torch.testing.assert_close(got_embeds, embeds)
                torch.testing.assert_close(got_pooled, pooled)
            elif family == "pixart-sigma":
                embeds, mask, _, _ = stock.encode_prompt(prompt, do_classifier_free_guidance=False, clean_caption=False)
                torch.testing.assert_close(batch["prompt_embeds"], embeds)
                assert torch.equal(batch["prompt_attention_mask"], mask)
                assert mask.shape[1] == 300 and 0 < int(mask.sum()) < 300
            else:
                embeds, pooled, text_ids = stock.encode_prompt(prompt, None)
                torch.testing.assert_close(batch["t5_embeds"], embeds)
                torch.testing.assert_close(batch["clip_pooled"], pooled)
                assert embeds.shape[1] == 512 and not text_ids.any()


def test_sd3_t5_length_is_configurable_and_part_of_the_cache_identity(family_models) -> None:
    from dittune.fingerprint import Fingerprinter
    from dittune.models.sd3.spec import SD3Spec

    model = family_models["sd3"]
    short, default = SD3Spec(model, t5_max_length=77), SD3Spec(model)
    (embedding,) = short.encode_prompts(short.load_text_encoders(torch.device("cpu"), torch.float32), PROMPTS[:1])
    assert embedding["t5_embeds"].shape[0] == 77 and default.t5_max_length == 256
    fp = Fingerprinter()
    assert short.text_identity(fp) != default.text_identity(fp)
    with pytest.raises(ValueError, match="fixed text length"):
        spec_class("hunyuan-dit")(model, t5_max_length=77)


def test_flux_packing_and_ids_match_the_pipeline() -> None:
    from diffusers import FluxPipeline

    from dittune.models.flux.spec import image_ids, pack_latents, unpack_latents

    latents = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 12), rtol=0, atol=0)
    assert torch.equal(unpack_latents(packed, 8, 12), latents)
    torch.testing.assert_close(
        FluxPipeline._unpack_latents(packed, 8 * 8, 12 * 8, 8), latents, rtol=0, atol=0
    )  # 64×96 pixels, VAE ×8
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 6, torch.device("cpu"), torch.float32)
    assert torch.equal(image_ids(8, 12, torch.device("cpu"), torch.float32), ids)


@pytest.mark.parametrize(("size", "expected_mu_len"), [((64, 64), 16), ((1024, 1024), 4096)])
def test_flux_training_shift_is_the_sampling_shift_for_that_size(family_models, size, expected_mu_len) -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from dittune.models.base import LossSettings
    from dittune.models.flux.spec import FluxSpec

    spec = FluxSpec(family_models["flux"])
    width, height = size
    shift = spec.sampling_shift(LossSettings(timestep_sampling="shift"), height // 8, width // 8)
    assert shift == pytest.approx(math.exp(calculate_shift(expected_mu_len)))
    assert spec.sampling_shift(LossSettings(timestep_sampling="logit_normal"), 8, 8) is None
    assert spec.sampling_shift(LossSettings(timestep_sampling="uniform", flow_shift=2.0), 8, 8) == 2.0


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("sigma", [0.05, 0.5, 0.95])
def test_flow_forward_turns_a_prediction_back_into_x0(family: str, sigma: float, family_models) -> None:
    """The spec's forward output, read as a velocity at σ, gives x0 = x_σ − σ·v: trained toward the
    true velocity (one image, many steps on the transformer), the recovered x0 approaches the data."""
    from dittune.models import flow_objective as flow

    spec = spec_class(family)(family_models[family])
    denoiser = spec.load_denoiser(torch.float32)
    encoders = spec.load_text_encoders(torch.device("cpu"), torch.float32)
    (text,) = spec.encode_prompts(encoders, PROMPTS[:1])
    text = {k: v.unsqueeze(0) for k, v in text.items()}
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, 8, 8, generator=generator)
    noise = torch.randn(1, 16, 8, 8, generator=generator)
    sigmas = torch.tensor([sigma])
    x_t = flow.noisy_latents(x0, noise, sigmas)

    def error() -> float:
        with torch.no_grad():
            v = spec.forward(denoiser, x_t, sigmas, text)
        return (flow.x0_from_velocity(x_t, v, sigmas) - x0).square().mean().item()

    before = error()
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=3e-3)
    for _ in range(150):
        loss, _ = flow.flow_matching_loss(spec.forward(denoiser, x_t, sigmas, text), x0, noise, sigmas)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert error() < 0.1 * before, (before, error())


def test_pixart_micro_conditions_reach_the_transformer(tmp_path) -> None:
    """A transformer with resolution/aspect embeddings gets each sample's size; a Sigma one gets none."""
    from dittune.models.base import SampleMeta, TrainBatch
    from dittune.models.pixart_sigma.spec import PixArtSigmaSpec
    from dittune.models.pixart_sigma.tiny import build_tiny_pixart_sigma

    spec = PixArtSigmaSpec(build_tiny_pixart_sigma(tmp_path / "m", variant="sigma-microconditions"))
    assert spec.uses_micro_conditions and any("micro-conditions" in w for w in spec.inspect().warnings)
    meta = [SampleMeta((64, 32), (64, 32), (0, 0)), SampleMeta((32, 64), (32, 64), (0, 0))]
    batch = TrainBatch(moments={}, text={}, meta=meta)
    cond = spec.micro_conditions(batch, torch.device("cpu"), torch.float32)
    assert cond["resolution"].tolist() == [[32.0, 64.0], [64.0, 32.0]]
    assert cond["aspect_ratio"].tolist() == [[0.5], [2.0]]
    encoders = spec.load_text_encoders(torch.device("cpu"), torch.float32)
    text = [spec.encode_prompts(encoders, PROMPTS[:1])[0]] * 2
    batch = TrainBatch({}, {k: torch.stack([t[k] for t in text]) for k in text[0]}, meta)
    denoiser = spec.load_denoiser(torch.float32)
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    with torch.no_grad():
        out = spec.forward(denoiser, x_t, t, batch)
        swapped = spec.forward(denoiser, x_t, t, TrainBatch({}, batch.text, meta[::-1]))
    assert out.shape == (2, 8, 8, 8) and not torch.allclose(out, swapped)
