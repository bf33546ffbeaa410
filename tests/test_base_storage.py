"""`model.base_storage`: the frozen base of a LoRA run in fp8 or quantised (bitsandbytes nf4 / int8).

Tiny real SD3 and Wan denoisers (random weights): LoRA gradients on one batch against the plain fp32 run within
stated tolerances, the Linear weights really stored small and the LoRA weights fp32, the same LoRA keys, no upcast
weight kept for backward, and short `dittune train` runs whose losses and LoRA follow the plain run's, with
validation through the stock pipeline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import make_dataset, write_config
from dittune.cli.main import main
from dittune.config import load_config
from dittune.models.base import ModelSpec, SampleMeta, TrainBatch
from dittune.models.checkpointing import SavedActivations
from dittune.models.lora import inject_lora, lora_state_dict
from dittune.models.registry import spec_class, tiny_builder
from dittune.models.storage import (
    BASE_STORAGES,
    FP8_DTYPES,
    applied_storage,
    apply_base_storage,
    frozen_linears,
    skip_patterns,
    tensor_bytes,
)
from dittune.train.preflight import device_checks, preflight

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle on a white background", "a blue circle"]
SIDE = 32
GRADIENT_TOLERANCE = {"fp8_e4m3": 0.07, "fp8_e5m2": 0.12, "nf4": 0.2, "int8": 0.012}
"""Bound on ‖g − g_plain‖ / ‖g_plain‖ over all LoRA gradients of one batch. Measured (SD3 / Wan, tiny random
models, fp32 compute): fp8_e4m3 0.047 / 0.030, fp8_e5m2 0.078 / 0.058, nf4 0.138 / 0.121, int8 0.0060 / 0.0039."""
PAYLOAD = {"fp8_e4m3": lambda n: n, "fp8_e5m2": lambda n: n, "nf4": lambda n: (n + 1) // 2, "int8": lambda n: n}
"""Bytes of a converted weight of n elements, without quantisation statistics."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, video_models: dict[str, Path]) -> dict[str, Path]:
    """An image family (SD3) and a video family (Wan); Flux, whose first layer is a converted Linear."""
    root = tmp_path_factory.mktemp("storage-models")
    models = {family: tiny_builder(family)(root / family, seed=0) for family in ("sd3", "flux")}
    return {**models, "wan": video_models["wan"]}


@pytest.fixture(scope="module")
def batches(models: dict[str, Path]) -> dict[str, TrainBatch]:
    """Two samples per family through its own text encoders and VAE (a 5-frame clip for Wan)."""
    result = {}
    for family, path in models.items():
        spec = spec_class(family)(path)
        frames = spec.frame_rule_at(path).snap_down(5)
        text = spec.encode_prompts(spec.load_text_encoders(torch.device("cpu"), torch.float32), PROMPTS)
        pixels = torch.rand(2, 3, frames, SIDE, SIDE, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with torch.no_grad():
            moments = spec.encode_pixels(spec.load_vae(torch.device("cpu"), torch.float32), pixels)
        result[family] = TrainBatch(
            moments={k: torch.stack([m[k] for m in moments]) for k in moments[0]},
            text={k: torch.stack([t[k] for t in text]) for k in text[0]},
            meta=[SampleMeta((SIDE, SIDE), (SIDE, SIDE), (0, 0), frames=frames, fps=8.0)] * 2,
        )
    return result


def lora_denoiser(spec: ModelSpec, storage: str) -> torch.nn.Module:
    """The fp32 denoiser with a rank-4 LoRA (B drawn, so A gets gradients too) and `storage` applied, as in
    `build_run`: injection first, then the storage."""
    torch.manual_seed(0)
    model = spec.load_denoiser(torch.float32).requires_grad_(False)
    inject_lora(model, rank=4, alpha=4.0, targets=list(spec.default_lora_targets))
    generator = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(True)
            if "lora_B" in name:
                with torch.no_grad():
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    apply_base_storage(model, storage, compute_dtype=torch.float32, spec_patterns=spec.storage_skip_patterns)
    return model.train()


def loss_and_grads(spec: ModelSpec, model: torch.nn.Module, batch: TrainBatch) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    out = spec.compute_loss(
        model, spec.load_scheduler(), batch, torch.Generator().manual_seed(7), spec.default_loss_settings("lora")
    )
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(grads: dict, reference: dict) -> float:
    diff = sum(float((grads[k] - reference[k]).pow(2).sum()) for k in reference)
    return math.sqrt(diff / sum(float(reference[k].pow(2).sum()) for k in reference))


# ----------------------------------------------------------------------------------------- gradients and storage
@pytest.mark.parametrize("storage", list(GRADIENT_TOLERANCE))
@pytest.mark.parametrize("family", ["sd3", "wan", "flux"])
def test_lora_gradients_match_the_plain_run(family: str, storage: str, models, batches) -> None:
    import bitsandbytes as bnb

    spec = spec_class(family)(models[family])
    plain, stored = lora_denoiser(spec, "default"), lora_denoiser(spec, storage)
    loss_ref, grads_ref = loss_and_grads(spec, plain, batches[family])
    loss, grads = loss_and_grads(spec, stored, batches[family])

    assert grads.keys() == grads_ref.keys() and len(grads) == len(lora_state_dict(plain))
    error = relative_error(grads, grads_ref)
    assert 0 < error < GRADIENT_TOLERANCE[storage], error
    assert abs(loss - loss_ref) < 0.01 * loss_ref

    report = applied_storage(stored)
    assert report is not None and report.converted > 0 and report.kept > 0
    converted, _ = frozen_linears(plain, skip_patterns(plain, spec.storage_skip_patterns))
    names = {name for name, _ in converted}
    modules = dict(stored.named_modules())
    kinds = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}
    for name in names:
        if storage in FP8_DTYPES:
            assert modules[name].weight.dtype == FP8_DTYPES[storage], name
        else:
            assert isinstance(modules[name], kinds[storage]), name
    for name, module in modules.items():
        if type(module) is torch.nn.Linear and name not in names:  # kept by skip patterns, and LoRA's layers
            assert module.weight.dtype == torch.float32, name
    assert all(p.dtype == torch.float32 for n, p in stored.named_parameters() if ".lora_" in n)
    assert stored.dtype == torch.float32  # what the stock pipelines read

    # exact bytes: the converted weights' payload, plus bitsandbytes' statistics (none for fp8)
    assert report.bytes_before == sum(layer.weight.nbytes for _, layer in converted)
    payload = sum(PAYLOAD[storage](layer.weight.numel()) for _, layer in converted)
    assert sum(modules[name].weight.nbytes for name in names) == payload
    assert report.bytes_after == payload if storage in FP8_DTYPES else report.bytes_after > payload
    assert tensor_bytes(stored) == tensor_bytes(plain) - report.bytes_before + report.bytes_after

    # the LoRA file: the same keys, shapes and dtypes as a plain run
    exported, reference = lora_state_dict(stored), lora_state_dict(plain)
    assert [(k, v.shape, v.dtype) for k, v in exported.items()] == [(k, v.shape, v.dtype) for k, v in reference.items()]


def test_skip_patterns_and_lora_layers_are_never_converted(models) -> None:
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    assert ModelSpec.storage_skip_patterns == DEFAULT_SKIP_MODULES_PATTERN
    spec = spec_class("sd3")(models["sd3"])
    model = spec.load_denoiser(torch.float32).requires_grad_(False)
    inject_lora(model, rank=4, alpha=4.0, targets=list(spec.default_lora_targets))
    for param in (p for n, p in model.named_parameters() if ".lora_" in n):
        param.requires_grad_(False)  # even frozen LoRA layers and no spec patterns: still left alone
    report = apply_base_storage(model, "fp8_e4m3", compute_dtype=torch.float32, spec_patterns=())
    lora_layers = [m for n, m in model.named_modules() if ".lora_A." in n or ".lora_B." in n]
    assert lora_layers and all(m.weight.dtype == torch.float32 for m in lora_layers)
    assert not any(hasattr(m, "_diffusers_hook") for m in lora_layers)
    # SD3's own `_skip_layerwise_casting_patterns` still keep its norms' modulation layers (norm1 and norm1_context
    # of 2 blocks, norm_out); proj_out, kept by the spec's patterns, is converted now
    assert report.kept == 5 and model.proj_out.weight.dtype == torch.float8_e4m3fn
    assert all(m.weight.dtype == torch.float32 for n, m in model.named_modules() if n.endswith("norm1.linear"))


def test_fp8_keeps_no_upcast_weight_for_backward(models, batches) -> None:
    """Bytes saved for the backward pass beyond the parameters: the same as the plain run (diffusers' own
    layerwise-casting hook would keep every upcast weight until backward)."""
    spec = spec_class("sd3")(models["sd3"])

    def held(model: torch.nn.Module) -> int:
        with SavedActivations(model) as saved:
            loss_and_grads(spec, model, batches["sd3"])
        return saved.bytes

    plain, stored = lora_denoiser(spec, "default"), lora_denoiser(spec, "fp8_e4m3")
    assert held(stored) == held(plain)
    stock = lora_denoiser(spec, "default")
    stock.enable_layerwise_casting(torch.float8_e4m3fn, torch.float32)
    # diffusers' hook keeps the fp32 copies of every layer that needs an input gradient: 66 % of the converted
    # weights' fp32 bytes here (the embedders before the first LoRA layer need none)
    assert held(stock) - held(plain) > 0.5 * applied_storage(stored).bytes_before


@pytest.mark.parametrize("storage", ["nf4", "int8"])
def test_training_after_an_eval_forward_is_unchanged(storage: str, models, batches) -> None:
    """bitsandbytes repacks 4-bit weights for CPU inference on AVX512-BF16 machines; training after validation
    must see the same layers."""
    spec = spec_class("sd3")(models["sd3"])
    model = lora_denoiser(spec, storage)
    _, before = loss_and_grads(spec, model, batches["sd3"])
    model.eval()
    with torch.no_grad():
        settings = spec.default_loss_settings("lora")
        spec.compute_loss(model, spec.load_scheduler(), batches["sd3"], torch.Generator().manual_seed(1), settings)
    model.train()
    _, after = loss_and_grads(spec, model, batches["sd3"])
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------------ config checks
def test_preflight_refusals(tmp_path: Path, models, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_dataset(tmp_path / "data", sizes=((64, 64),), colours=("red",))
    path = write_config(tmp_path / "cfg.toml", models["sd3"], data, tmp_path / "run", family="sd3")
    config = lambda *overrides: load_config(path, list(overrides))  # noqa: E731
    assert config().model.base_storage == "default"
    assert get_args(type(config().model).model_fields["base_storage"].annotation) == BASE_STORAGES
    assert preflight(config('model.base_storage="fp8_e4m3"')) == []
    problems = dict(preflight(config('model.base_storage="nf4"', 'train.method="full"')))
    assert "LoRA" in problems["model.base_storage"]
    assert "MPS" in dict(device_checks(config('model.base_storage="fp8_e5m2"'), "mps"))["model.base_storage"]
    assert device_checks(config('model.base_storage="fp8_e5m2"'), "cpu") == []

    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    problems = dict(preflight(config('model.base_storage="int8"')))
    assert 'pip install "dittune[bnb]"' in problems["model.base_storage"]
    with pytest.raises(Exception, match="base_storage"):
        config('model.base_storage="fp4"')


# ------------------------------------------------------------------------------------------------- end to end
STEPS = 6
VALIDATION = f"""
[validation]
every_steps = {STEPS}
prompts = ["{PROMPTS[0]}"]
steps = 2
[lora]
rank = 4
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, models) -> dict[str, Path]:
    """storage → output folder of a short SD3 LoRA run on 4 images (one shared cache), run on first use."""
    root = tmp_path_factory.mktemp("storage-runs")
    data = make_dataset(root / "data", sizes=((64, 64),))

    class Runs(dict):
        def __missing__(self, storage: str) -> Path:
            out = root / storage
            extra = f'{VALIDATION}[cache]\ndir = "{root / "cache"}"\n'
            cfg = write_config(root / f"{storage}.toml", models["sd3"], data, out, extra, family="sd3", max_steps=STEPS)
            args = ["train", str(cfg), "--set", f'model.base_storage="{storage}"', "--set", "train.learning_rate=0.01"]
            assert main(args) == 0, storage
            self[storage] = out
            return out

    return Runs()


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _objective(spec: ModelSpec, cache: Path, lora: Path | None) -> float:
    """The training objective on the run's 4 cached images at fixed draws, of the plain fp32 base in its stock
    pipeline with the LoRA file loaded by `dittune.load_lora` (None: the base alone)."""
    import dittune
    from dittune.cache.store import CacheStore

    store = CacheStore(cache)
    text = {store.fields("text", e.stem)["prompt"]: load_file(e) for e in store.entries("text")}
    samples = []
    for entry in store.entries("latents"):
        colour = Path(store.fields("latents", entry.stem)["source"]).stem.split("_")[0]
        samples.append((load_file(entry), text[f"a {colour} circle on a white background"]))
    batch = TrainBatch(
        {k: torch.stack([m[k] for m, _ in samples]) for k in samples[0][0]},
        {k: torch.stack([t[k] for _, t in samples]) for k in samples[0][1]},
        [SampleMeta((64, 64), (64, 64), (0, 0))] * len(samples),
    )
    vae = spec.load_vae(torch.device("cpu"), torch.float32)
    pipeline = spec.build_pipeline(spec.load_denoiser(torch.float32), vae, spec.load_scheduler())
    if lora is not None:
        dittune.load_lora(pipeline, lora)
    settings = spec.default_loss_settings("lora")
    settings.sample_latents = False
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        losses = [
            spec.compute_loss(pipeline.transformer, spec.load_scheduler(), batch, generator, settings).loss
            for _ in range(16)
        ]
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize(
    ("storage", "min_cosine", "min_gain"),
    [("fp8_e4m3", 0.97, 0.9), ("nf4", 0.9, 0.8)],
)
def test_dittune_run_trains_like_the_plain_run(
    storage: str, min_cosine: float, min_gain: float, runs, models, capsys
) -> None:
    """6 steps at lr 0.01 (measured against the plain run: losses within 0.03 %; LoRA B cosine 0.988 fp8,
    0.945 nf4; the plain base's objective falls by 1.00× / 0.96× as much; validation pixels differ by 0.7 / 1.9
    of 255 on average)."""
    plain = runs["default"]
    capsys.readouterr()
    out = runs[storage]
    assert f"Storage    {storage}: " in capsys.readouterr().out

    losses, reference = _losses(out), _losses(plain)
    assert len(losses) == STEPS
    assert all(abs(a - b) < 1e-3 * b for a, b in zip(losses, reference)), (losses, reference)

    lora, lora_ref = load_file(out / "final" / "lora.safetensors"), load_file(plain / "final" / "lora.safetensors")
    assert [(k, v.shape, v.dtype) for k, v in lora.items()] == [(k, v.shape, v.dtype) for k, v in lora_ref.items()]
    b_keys = [k for k in lora if "lora_B" in k]  # B starts at zero: what the run learned
    learned = torch.cat([lora[k].flatten() for k in b_keys])
    learned_ref = torch.cat([lora_ref[k].flatten() for k in b_keys])
    assert torch.nn.functional.cosine_similarity(learned, learned_ref, dim=0) > min_cosine

    # the LoRA, loaded onto the plain base, lowers the training objective about as much as the plain run's
    spec = spec_class("sd3")(models["sd3"])
    cache = out.parent / "cache"
    base = _objective(spec, cache, None)
    gain, gain_ref = (
        base - _objective(spec, cache, out / "final" / "lora.safetensors"),
        base - _objective(spec, cache, plain / "final" / "lora.safetensors"),
    )
    assert gain_ref > 0.02 * base and gain > min_gain * gain_ref, (base, gain, gain_ref)

    # validation ran through the stock pipeline at the start and the end, close to the plain run's images
    for step in (0, STEPS):
        (image,) = (out / "validation" / f"step_{step:08d}").glob("00-*.png")
        (image_ref,) = (plain / "validation" / f"step_{step:08d}").glob("00-*.png")
        got, want = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (image, image_ref))
        assert got.shape == want.shape and np.abs(got - want).mean() < 4


def test_video_run_with_fp8_base_under_the_default_precision(tmp_path: Path, models, capsys) -> None:
    """Wan with fp8 storage and `train.mixed_precision = "auto"` (bf16 autocast on CPUs with native bf16, fp32
    elsewhere): trains, validates a clip through the stock pipeline, and exports the plain run's LoRA layout."""
    from conftest import make_video_dataset
    from dittune.data.video import probe_video

    data = make_video_dataset(tmp_path / "data", frames=5, colours=("red",))
    extra = VALIDATION.replace("steps = 2", "steps = 2\nframes = 5").replace(
        f"every_steps = {STEPS}", "every_steps = 2"
    )
    cfg = write_config(tmp_path / "cfg.toml", models["wan"], data, tmp_path / "run", extra, family="wan", max_steps=2)
    cfg.write_text(cfg.read_text().replace("[train]", "frames = 5\n[train]", 1))
    args = ["train", str(cfg), "--set", 'model.base_storage="fp8_e4m3"', "--set", 'train.mixed_precision="auto"']
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Storage    fp8_e4m3: " in printed
    assert all(np.isfinite(loss) for loss in _losses(tmp_path / "run"))
    for step in (0, 2):
        (clip,) = (tmp_path / "run" / "validation" / f"step_{step:08d}").glob("00-*.mp4")
        assert probe_video(clip).frames == 5

    spec = spec_class("wan")(models["wan"])
    plain = lora_denoiser(spec, "default")
    expected = {f"transformer.{k}": (v.shape, torch.float32) for k, v in lora_state_dict(plain).items()}
    exported = load_file(tmp_path / "run" / "final" / "lora.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in exported.items()} == expected


@pytest.mark.parametrize("storage", list(GRADIENT_TOLERANCE))
def test_converted_layers_return_what_autocast_returns(storage: str) -> None:
    """Under bf16 autocast a Linear returns bf16, and a bf16 LayerNorm after it relies on that (Hunyuan-DiT's
    norm_k after to_k on fp32 text embeddings)."""
    torch.manual_seed(0)
    plain = (
        torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64)).to(torch.bfloat16).requires_grad_(False)
    )
    stored = (
        torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64)).to(torch.bfloat16).requires_grad_(False)
    )
    stored.load_state_dict(plain.state_dict())
    report = apply_base_storage(stored, storage, compute_dtype=torch.bfloat16, spec_patterns=())
    assert report.converted == 1
    x = torch.randn(4, 64)
    with torch.autocast("cpu", torch.bfloat16):
        want, got = plain(x), stored(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert (got.float() - want.float()).norm() < 0.2 * want.float().norm()


def test_ddp_wraps_a_stored_denoiser(models, tmp_path: Path) -> None:
    """DDP broadcasts every parameter when it wraps a model and gloo has no fp8 ("Invalid scalar type"): the
    converted weights, identical in every process, are left out."""
    import torch.distributed as dist

    created = not dist.is_initialized()  # an existing group (of this process alone) serves as well
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        stored = lora_denoiser(spec_class("sd3")(models["sd3"]), "fp8_e4m3")
        ignored = set(stored._ddp_params_and_buffers_to_ignore)
        assert {n for n, p in stored.named_parameters() if p.dtype == torch.float8_e4m3fn} <= ignored
        assert not any(".lora_" in name for name in ignored)
        torch.nn.parallel.DistributedDataParallel(stored)
    finally:
        if created:
            dist.destroy_process_group()


def test_fp8_storage_with_partial_checkpointing_resumes_bit_identically(models, tmp_path: Path) -> None:
    """Two memory options together through `dittune train`: 4 steps straight against a crash after the step-2
    checkpoint and `--resume latest` give identical LoRA files."""
    import shutil

    from conftest import make_dataset
    from dittune.cli.main import main

    data = make_dataset(tmp_path / "data")
    straight = tmp_path / "straight"
    settings = dict(gradient_checkpointing=True, gradient_checkpointing_ratio=0.5, learning_rate=1e-3)
    extra = "[checkpoint]\nevery_steps = 2\nkeep_last = 5\n"
    cfg = write_config(tmp_path / "cfg.toml", models["sd3"], data, straight, extra, family="sd3", **settings)
    cfg.write_text(cfg.read_text().replace("[model]\n", '[model]\nbase_storage = "fp8_e4m3"\n'))
    assert main(["train", str(cfg)]) == 0
    crashed = tmp_path / "crashed"
    shutil.copytree(straight / "checkpoints" / "step_00000002", crashed / "checkpoints" / "step_00000002")
    args = ["train", str(cfg), "--set", f"output_dir={crashed}", "--set", f"cache.dir={straight / 'cache'}"]
    assert main([*args, "--resume", "latest"]) == 0
    a, b = (load_file(run / "final" / "lora.safetensors") for run in (straight, crashed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    moved = [bool(a[k].abs().max() > 0) for k in a if "lora_B" in k]
    assert sum(moved) > len(moved) // 2, moved  # it trained (a few adapters sit on outputs the loss never sees)
