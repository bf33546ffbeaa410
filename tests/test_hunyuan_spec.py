"""HunyuanDiTSpec on the tiny real models: folder checks, version detection, text encoding and RoPE
against the stock diffusers pipeline, size conditioning, the training loss, and latents from moments."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import HunyuanDiTPipeline
from diffusers.models.embeddings import get_2d_rotary_pos_embed
from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

from conftest import make_dataset
from dittune.data.transforms import load_pixels
from dittune.data.types import Placement
from dittune.models.base import LossSettings, SampleMeta, TrainBatch
from dittune.models.hunyuan_dit.spec import HunyuanDiTSpec, HunyuanTextEncoders, rotary_embedding

CPU = torch.device("cpu")
HEAD_DIM, PATCH = 16, 2
"""Tiny transformer: 2 heads of 16, patch 2 (see dittune.models.hunyuan_dit.tiny)."""
WIDTH, HEIGHT = 96, 64
"""The non-square training bucket used below: an 8×12 (h×w) latent."""
ENGLISH = "a red circle on a white background"
CHINESE = "白色背景上的红色圆形"


pytestmark = pytest.mark.usefixtures("one_thread")


def copy_model(source: Path, dest: Path) -> Path:
    return Path(shutil.copytree(source, dest))


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------- folder and version


def test_versions_are_detected_from_the_weights(tiny_models: dict[str, Path]) -> None:
    v11 = HunyuanDiTSpec(tiny_models["v1.1"]).inspect()
    v12 = HunyuanDiTSpec(tiny_models["v1.2"]).inspect()
    assert (v11.version, v12.version) == ("v1.0/v1.1", "v1.2")
    assert v11.family == v12.family == "hunyuan-dit"
    assert v11.summary["layers"] == v12.summary["layers"] == 4
    assert v11.summary["size/style conditioning"] is True
    assert v12.summary["size/style conditioning"] is False
    assert v11.warnings == [] and v12.warnings == []
    assert HunyuanDiTSpec(tiny_models["v1.1"]).uses_size_conditioning
    assert not HunyuanDiTSpec(tiny_models["v1.2"]).uses_size_conditioning


def test_distilled_folder_name_is_reported(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(tiny_models["v1.2"], tmp_path / "HunyuanDiT-v1.2-Diffusers-Distilled")
    assert HunyuanDiTSpec(model).inspect().version == "v1.2 (distilled)"


@pytest.mark.parametrize(("variant", "claims_style"), [("v1.2", True), ("v1.1", False)])
def test_config_contradicting_the_weights_is_an_error(
    tiny_models: dict[str, Path], tmp_path: Path, variant: str, claims_style: bool
) -> None:
    model = copy_model(tiny_models[variant], tmp_path / "model")
    edit_json(model / "transformer" / "config.json", use_style_cond_and_image_meta_size=claims_style)
    with pytest.raises(ValueError, match="style embedder") as error:
        HunyuanDiTSpec(model).inspect()
    assert "use_style_cond_and_image_meta_size" in str(error.value)


def test_unexpected_beta_end_warns(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(tiny_models["v1.2"], tmp_path / "model")
    edit_json(model / "scheduler" / "scheduler_config.json", beta_end=0.03)
    info = HunyuanDiTSpec(model).inspect()
    assert info.version == "v1.2"
    assert len(info.warnings) == 1
    assert "beta_end" in info.warnings[0] and "0.018" in info.warnings[0] and "0.03" in info.warnings[0]


def test_epsilon_prediction_is_rejected(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(tiny_models["v1.2"], tmp_path / "model")
    edit_json(model / "scheduler" / "scheduler_config.json", prediction_type="epsilon")
    with pytest.raises(ValueError, match="prediction_type") as error:
        HunyuanDiTSpec(model).inspect()
    assert "v_prediction" in str(error.value)


def test_folder_problems_name_what_is_missing(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    assert HunyuanDiTSpec.check_folder(tiny_models["v1.2"]) == []

    missing = HunyuanDiTSpec.check_folder(tmp_path / "nowhere")
    assert len(missing) == 1 and "does not exist" in missing[0]

    no_index = copy_model(tiny_models["v1.2"], tmp_path / "no-index")
    (no_index / "model_index.json").unlink()
    problems = HunyuanDiTSpec.check_folder(no_index)
    assert len(problems) == 1 and "model_index.json" in problems[0] and "diffusers" in problems[0]

    no_vae = copy_model(tiny_models["v1.2"], tmp_path / "no-vae")
    shutil.rmtree(no_vae / "vae")
    problems = HunyuanDiTSpec.check_folder(no_vae)
    assert len(problems) == 1 and "vae/" in problems[0]

    wrong_class = copy_model(tiny_models["v1.2"], tmp_path / "wrong-class")
    edit_json(wrong_class / "model_index.json", _class_name="StableDiffusionPipeline")
    problems = HunyuanDiTSpec.check_folder(wrong_class)
    assert len(problems) == 1 and "StableDiffusionPipeline" in problems[0]


# ------------------------------------------------------------------------------------------- text


@pytest.fixture(scope="module")
def spec12(tiny_models: dict[str, Path]) -> HunyuanDiTSpec:
    return HunyuanDiTSpec(tiny_models["v1.2"])


@pytest.fixture(scope="module")
def encoders12(spec12: HunyuanDiTSpec) -> HunyuanTextEncoders:
    return spec12.load_text_encoders(CPU, torch.float32)


@pytest.fixture(scope="module")
def pipeline12(tiny_models: dict[str, Path]) -> HunyuanDiTPipeline:
    pipeline = HunyuanDiTPipeline.from_pretrained(tiny_models["v1.2"], torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_encode_prompts_shapes_and_masks(encoders12: HunyuanTextEncoders, spec12: HunyuanDiTSpec) -> None:
    prompts = [ENGLISH, CHINESE, ""]
    embeddings = spec12.encode_prompts(encoders12, prompts)
    assert len(embeddings) == 3
    for prompt, embedding in zip(prompts, embeddings):
        assert set(embedding) == {slot_key for slot in spec12.text_encoders for slot_key in slot.keys}
        assert embedding["prompt_embeds"].shape == (77, 32)
        assert embedding["prompt_attention_mask"].shape == (77,)
        assert embedding["prompt_embeds_2"].shape == (256, 32)
        assert embedding["prompt_attention_mask_2"].shape == (256,)
        assert embedding["prompt_embeds"].dtype == torch.float32
        assert torch.isfinite(embedding["prompt_embeds"]).all() and torch.isfinite(embedding["prompt_embeds_2"]).all()
        for mask_key, tokenizer in (
            ("prompt_attention_mask", encoders12.tokenizer),
            ("prompt_attention_mask_2", encoders12.tokenizer_2),
        ):
            mask = embedding[mask_key]
            real = len(tokenizer(prompt).input_ids)  # includes [CLS]/[SEP] or </s>
            assert real >= 1
            assert mask[:real].eq(1).all() and mask[real:].eq(0).all()
    # the empty prompt (used for caption dropout) still has its special tokens
    assert int(embeddings[2]["prompt_attention_mask"].sum()) == 2
    assert int(embeddings[2]["prompt_attention_mask_2"].sum()) == 1
    # different prompts really give different states
    assert not torch.allclose(embeddings[0]["prompt_embeds"], embeddings[1]["prompt_embeds"])


def test_tokenizers_pad_with_zero_and_know_chinese(encoders12: HunyuanTextEncoders) -> None:
    for tokenizer, length in ((encoders12.tokenizer, 77), (encoders12.tokenizer_2, 256)):
        for prompt in (ENGLISH, CHINESE):
            ids = tokenizer(prompt, padding="max_length", max_length=length).input_ids
            real = len(tokenizer(prompt).input_ids)
            assert len(ids) == length
            assert ids[real:] == [0] * (length - real)
            assert tokenizer.unk_token_id not in ids


@pytest.mark.parametrize("prompt", [ENGLISH, CHINESE, ""])
def test_embeddings_match_the_stock_pipeline(
    prompt: str, spec12: HunyuanDiTSpec, encoders12: HunyuanTextEncoders, pipeline12: HunyuanDiTPipeline
) -> None:
    (ours,) = spec12.encode_prompts(encoders12, [prompt])
    for index, length, suffix in ((0, 77, ""), (1, 256, "_2")):
        embeds, _, mask, _ = pipeline12.encode_prompt(
            prompt,
            device="cpu",
            dtype=torch.float32,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=length,
            text_encoder_index=index,
        )
        torch.testing.assert_close(ours[f"prompt_embeds{suffix}"], embeds[0], atol=1e-6, rtol=0)
        assert torch.equal(ours[f"prompt_attention_mask{suffix}"], mask[0])


# ------------------------------------------------------------------------------------------- RoPE


@pytest.fixture(scope="module")
def pipeline_rope(pipeline12: HunyuanDiTPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) the stock pipeline hands its transformer for a 96×64 image."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(kwargs["image_rotary_emb"])

    handle = pipeline12.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipeline12(
            ENGLISH,
            width=WIDTH,
            height=HEIGHT,
            num_inference_steps=1,
            guidance_scale=1.0,
            use_resolution_binning=False,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        handle.remove()
    assert len(captured) == 1
    return captured[0]


def test_rope_matches_the_pipeline_for_a_non_square_bucket(pipeline_rope: tuple[torch.Tensor, torch.Tensor]) -> None:
    cos, sin = rotary_embedding(HEAD_DIM, HEIGHT // 8, WIDTH // 8, PATCH, CPU)
    grid = (HEIGHT // 8 // PATCH, WIDTH // 8 // PATCH)
    assert cos.shape == sin.shape == (grid[0] * grid[1], HEAD_DIM)
    torch.testing.assert_close(cos, pipeline_rope[0], atol=0, rtol=0)
    torch.testing.assert_close(sin, pipeline_rope[1], atol=0, rtol=0)
    # the same thing spelled out with diffusers' helpers
    crops = get_resize_crop_region_for_grid(grid, 512 // 8 // PATCH)
    ref_cos, ref_sin = get_2d_rotary_pos_embed(HEAD_DIM, crops, grid, use_real=True, device=CPU, output_type="pt")
    torch.testing.assert_close(cos, ref_cos, atol=0, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=0, rtol=0)


def test_rope_differs_between_buckets() -> None:
    wide = rotary_embedding(HEAD_DIM, 8, 12, PATCH, CPU)
    tall = rotary_embedding(HEAD_DIM, 12, 8, PATCH, CPU)
    square = rotary_embedding(HEAD_DIM, 8, 8, PATCH, CPU)
    assert wide[0].shape == tall[0].shape
    assert not torch.allclose(wide[0], tall[0])
    assert not torch.allclose(wide[1], tall[1])
    assert square[0].shape == (16, HEAD_DIM)


# --------------------------------------------------------------------------------- size conditioning


def test_image_meta_size_follows_the_official_training_order(tiny_models: dict[str, Path]) -> None:
    spec = HunyuanDiTSpec(tiny_models["v1.1"])
    batch = TrainBatch(
        moments={},
        text={},
        meta=[
            SampleMeta(original_size=(300, 200), target_size=(96, 64), crop_left_top=(5, 7)),
            SampleMeta(original_size=(480, 640), target_size=(64, 96), crop_left_top=(0, 3), flipped=True),
        ],
    )
    meta = spec.image_meta_size(batch, CPU)
    # (orig_w, orig_h, target_w, target_h, crop_left, crop_top)
    expected = torch.tensor([[300, 200, 96, 64, 5, 7], [480, 640, 64, 96, 0, 3]], dtype=torch.float32)
    assert meta.dtype == torch.float32
    assert torch.equal(meta, expected)


# --------------------------------------------------------------------------------------------- loss


def real_batch(spec: HunyuanDiTSpec, root: Path) -> TrainBatch:
    """Two 96×64 circles: moments from the model's VAE, text from its encoders."""
    data = make_dataset(root, sizes=((WIDTH, HEIGHT),), colours=("red", "blue"))
    placement = Placement(bucket=(WIDTH, HEIGHT), resized=(WIDTH, HEIGHT), crop_left_top=(0, 0))
    names = ("red_0", "blue_0")
    pixels = torch.stack([load_pixels(data / f"{name}.png", placement, flip=False) for name in names])
    moments = spec.encode_pixels(spec.load_vae(CPU, torch.float32), pixels)
    captions = [(data / f"{name}.txt").read_text() for name in names]
    texts = spec.encode_prompts(spec.load_text_encoders(CPU, torch.float32), captions)
    return TrainBatch(
        moments={key: torch.stack([m[key] for m in moments]) for key in moments[0]},
        text={key: torch.stack([t[key] for t in texts]) for key in texts[0]},
        meta=[SampleMeta(original_size=(WIDTH, HEIGHT), target_size=(WIDTH, HEIGHT), crop_left_top=(0, 0))] * 2,
    )


@pytest.fixture(scope="module")
def batches(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainBatch]:
    root = tmp_path_factory.mktemp("spec-batches")
    return {variant: real_batch(HunyuanDiTSpec(path), root / variant) for variant, path in tiny_models.items()}


def loss_of(spec: HunyuanDiTSpec, denoiser: torch.nn.Module, batch: TrainBatch, seed: int = 0, **settings: Any) -> Any:
    return spec.compute_loss(
        denoiser, spec.load_scheduler(), batch, torch.Generator().manual_seed(seed), LossSettings(**settings)
    )


def test_real_batch_has_the_expected_layout(batches: dict[str, TrainBatch]) -> None:
    batch = batches["v1.2"]
    assert batch.moments["mean"].shape == batch.moments["logvar"].shape == (2, 4, HEIGHT // 8, WIDTH // 8)
    assert batch.text["prompt_embeds"].shape == (2, 77, 32)
    assert batch.text["prompt_embeds_2"].shape == (2, 256, 32)


@pytest.mark.parametrize("variant", ["v1.1", "v1.2"])
def test_loss_is_finite_and_trains_the_transformer(
    variant: str, tiny_models: dict[str, Path], batches: dict[str, TrainBatch]
) -> None:
    spec = HunyuanDiTSpec(tiny_models[variant])
    denoiser = spec.load_denoiser(torch.float32).train()
    seen: dict[str, Any] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.update(kwargs)
        seen["hidden_states"] = args[0]

    handle = denoiser.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = loss_of(spec, denoiser, batches[variant])
    finally:
        handle.remove()
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.loss.item() > 0
    assert out.logs["loss_vlb"] == 0.0  # LossSettings() has vlb off
    assert math.isclose(float(out.logs["loss_mse"]), out.loss.item(), rel_tol=1e-6)
    out.loss.backward()
    for name in ("pos_embed.proj.weight", "blocks.0.attn1.to_q.weight", "blocks.3.ff.net.2.weight", "proj_out.weight"):
        grad = denoiser.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the non-square bucket gets its own RoPE, and only v1.1 gets size/style conditioning
    assert seen["hidden_states"].shape == (2, 4, HEIGHT // 8, WIDTH // 8)
    expected_rope = rotary_embedding(HEAD_DIM, HEIGHT // 8, WIDTH // 8, PATCH, CPU)
    assert all(torch.equal(a, b) for a, b in zip(seen["image_rotary_emb"], expected_rope))
    if variant == "v1.1":
        assert torch.equal(seen["image_meta_size"], torch.tensor([[96.0, 64.0, 96.0, 64.0, 0.0, 0.0]] * 2))
        assert torch.equal(seen["style"], torch.zeros(2, dtype=torch.long))
        assert denoiser.get_parameter("time_extra_emb.style_embedder.weight").grad.abs().sum() > 0
    else:
        assert "image_meta_size" not in seen and "style" not in seen


def test_loss_matches_pipeline_rope(
    tiny_models: dict[str, Path], batches: dict[str, TrainBatch], pipeline_rope: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Training and sampling see identical positions for the same bucket."""
    spec = HunyuanDiTSpec(tiny_models["v1.2"])
    denoiser = spec.load_denoiser(torch.float32)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["image_rotary_emb"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            loss_of(spec, denoiser, batches["v1.2"])
    finally:
        handle.remove()
    assert torch.equal(seen[0][0], pipeline_rope[0]) and torch.equal(seen[0][1], pipeline_rope[1])


def test_vlb_adds_a_positive_term(tiny_models: dict[str, Path], batches: dict[str, TrainBatch]) -> None:
    spec = HunyuanDiTSpec(tiny_models["v1.2"])
    denoiser = spec.load_denoiser(torch.float32)
    with torch.no_grad():
        plain = loss_of(spec, denoiser, batches["v1.2"], vlb=False)
        with_vlb = loss_of(spec, denoiser, batches["v1.2"], vlb=True)
    logs = {name: {k: float(v) for k, v in out.logs.items()} for name, out in (("vlb", with_vlb), ("plain", plain))}
    assert logs["vlb"]["loss_vlb"] > 0
    assert with_vlb.loss.item() != plain.loss.item()
    # same seed → same timesteps and noise → same MSE part; the VLB is added on top
    assert logs["vlb"]["loss_mse"] == pytest.approx(logs["plain"]["loss_mse"], rel=1e-6)
    assert with_vlb.loss.item() == pytest.approx(logs["vlb"]["loss_mse"] + logs["vlb"]["loss_vlb"], rel=1e-5)


def test_loss_is_deterministic_given_the_seed(tiny_models: dict[str, Path], batches: dict[str, TrainBatch]) -> None:
    spec = HunyuanDiTSpec(tiny_models["v1.1"])
    denoiser = spec.load_denoiser(torch.float32)
    with torch.no_grad():
        first = loss_of(spec, denoiser, batches["v1.1"], seed=3, vlb=True)
        again = loss_of(spec, denoiser, batches["v1.1"], seed=3, vlb=True)
        other = loss_of(spec, denoiser, batches["v1.1"], seed=4, vlb=True)
    assert torch.equal(first.loss, again.loss)
    assert {k: float(v) for k, v in first.logs.items()} == {k: float(v) for k, v in again.logs.items()}
    assert not torch.equal(first.loss, other.loss)


@pytest.mark.parametrize(
    ("weights", "autocast"), [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)]
)
def test_timesteps_reach_the_time_embedding_in_float32(
    weights: torch.dtype, autocast: bool, tiny_models: dict[str, Path], batches: dict[str, TrainBatch]
) -> None:
    """bf16 cannot hold whole numbers above 256, so timesteps must never be cast to it."""
    spec = HunyuanDiTSpec(tiny_models["v1.1"])
    denoiser = spec.load_denoiser(weights)
    assert denoiser.proj_out.weight.dtype == weights
    seen: list[tuple[torch.Tensor, ...]] = []
    handle = denoiser.time_extra_emb.register_forward_pre_hook(lambda module, args: seen.append(args))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = loss_of(spec, denoiser, batches["v1.1"])
    finally:
        handle.remove()
    assert torch.isfinite(out.loss)
    timestep, _, image_meta_size, _ = seen[0]
    assert timestep.dtype == torch.float32
    assert image_meta_size.dtype == torch.float32


# ------------------------------------------------------------------------------------------ latents


def fake_moments() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 4, 32, 32, generator=generator)
    return {"mean": mean, "logvar": torch.full_like(mean, -2.0)}


def test_latents_from_moments_mode_is_the_scaled_mean(spec12: HunyuanDiTSpec) -> None:
    assert spec12.vae_config["scaling_factor"] == 0.13025
    moments = fake_moments()
    latents = spec12.latents_from_moments(moments, torch.Generator().manual_seed(0), sample=False)
    assert torch.equal(latents, moments["mean"] * 0.13025)


def test_latents_from_moments_samples_reproducibly(spec12: HunyuanDiTSpec) -> None:
    moments = fake_moments()
    one = spec12.latents_from_moments(moments, torch.Generator().manual_seed(1), sample=True)
    again = spec12.latents_from_moments(moments, torch.Generator().manual_seed(1), sample=True)
    other = spec12.latents_from_moments(moments, torch.Generator().manual_seed(2), sample=True)
    assert torch.equal(one, again)
    assert not torch.equal(one, other)
    mode = moments["mean"] * 0.13025
    assert not torch.allclose(one, mode)
    # the draw is mean + std · N(0, 1) with std = exp(logvar / 2), before scaling
    standardised = (one / 0.13025 - moments["mean"]) / math.exp(-1.0)
    assert abs(standardised.mean().item()) < 0.05
    assert abs(standardised.std().item() - 1.0) < 0.05


def test_latent_scale_and_shift_come_from_the_vae_config(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(tiny_models["v1.2"], tmp_path / "model")
    edit_json(model / "vae" / "config.json", scaling_factor=0.5, shift_factor=0.25)
    moments = fake_moments()
    latents = HunyuanDiTSpec(model).latents_from_moments(moments, torch.Generator().manual_seed(0), sample=False)
    torch.testing.assert_close(latents, (moments["mean"] - 0.25) * 0.5)
