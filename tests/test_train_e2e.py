"""End-to-end runs through `dittune train` on tiny real Hunyuan-DiT pipelines (v1.1 and v1.2)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import read_image, read_metrics, write_config
from dittune.cli.main import main
from dittune.train.state_io import load_tree

PROMPT = "a red circle on a white background"
VALIDATION = f"""
[checkpoint]
every_steps = 2
keep_last = 1
[validation]
every_steps = 2
prompts = ["{PROMPT}"]
negative_prompt = "blurry"
steps = 3
guidance = 4.0
"""


@pytest.mark.parametrize(
    ("variant", "method", "train_extra"),
    [
        ("v1.2", "lora", {"gradient_checkpointing": True, "trackers": ["tensorboard"]}),
        ("v1.1", "lora", {"mixed_precision": "bf16"}),
        ("v1.2", "full", {"gradient_accumulation_steps": 2}),
        ("v1.1", "full", {}),
    ],
)
def test_train_produces_outputs(tmp_path, tiny_models, dataset, variant, method, train_extra, capsys):
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "cfg.toml", tiny_models[variant], dataset, out, VALIDATION, method=method, **train_extra
    )
    assert main(["train", str(cfg)]) == 0
    printed = capsys.readouterr().out
    version = "v1.0/v1.1" if variant == "v1.1" else "v1.2"
    for expected in (
        f"Hunyuan-DiT {version}",
        "8 images in 2 bucket(s)",
        "latents: 0 cached, 8 encoded",
        "trainable of",
        f"Training   {method}",
        "Buckets: 2",
    ):
        assert expected in printed, expected
    assert printed.index("Buckets: 2") < printed.index("Model      Hunyuan-DiT")  # report comes before training

    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "step_time", "samples_per_s", "peak_memory_mb"):
        assert all(np.isfinite(m[key]) for m in metrics), key
    vlb = [m["loss_vlb"] for m in metrics]
    with Image.open(out / "loss.png") as plot:
        assert plot.size[0] > 400
    assert all(v > 0 for v in vlb) if method == "full" else all(v == 0 for v in vlb)

    for step in (0, 2, 4):
        folder = out / "validation" / f"step_{step:08d}"
        assert (folder / "grid.png").is_file() and len(list(folder.glob("00-*.png"))) == 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000004"]
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert bool(events) == ("tensorboard" in train_extra.get("trackers", []))

    final = out / "final"
    base = tiny_models[variant]
    card = (final / "README.md").read_text(encoding="utf-8")  # the model card
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == str(base) and front["library_name"] == "diffusers"
    assert ("lora" in front["tags"]) == (method == "lora") and "hunyuan-dit" in front["tags"]
    assert front["instance_prompt"] == "circle white background"  # the words all 8 captions share
    assert (final / "validation.png").read_bytes() == (out / "validation" / "step_00000004" / "grid.png").read_bytes()
    assert "![validation grid](validation.png)" in card and "| steps | 4 |" in card
    assert "Trigger words" not in (base / "README.md").read_text(encoding="utf-8")  # full: not written through a link
    if method == "lora":
        with safe_open(final / "lora.safetensors", framework="pt") as handle:
            meta = json.loads(handle.metadata()["dittune_lora"])
            keys = list(handle.keys())
        assert meta["family"] == "hunyuan-dit" and meta["rank"] == 16 and meta["alpha"] == 16.0
        assert meta["version"] == ("v1.0/v1.1" if variant == "v1.1" else "v1.2")
        assert meta["extra"]["config"]["train"]["method"] == "lora"
        assert all(k.startswith("transformer.blocks.") and ".lora_" in k for k in keys)
        assert any(".attn2.to_k.lora_B" in k for k in keys)
    else:
        from diffusers import HunyuanDiTPipeline

        pipeline = HunyuanDiTPipeline.from_pretrained(final)
        tuned = pipeline.transformer.state_dict()
        original = load_file(base / "transformer" / "diffusion_pytorch_model.safetensors")
        assert tuned.keys() == original.keys()
        assert any(not torch.equal(tuned[k], original[k]) for k in original)
        assert (final / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
            base / "vae" / "diffusion_pytorch_model.safetensors"
        ).read_bytes()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_is_bit_identical(tmp_path, tiny_models, dataset, method):
    """N steps straight vs N/2, a crash, and `--resume latest`: identical final tensors."""
    extra = "[checkpoint]\nevery_steps = 3\nkeep_last = 5\n"
    settings = dict(
        method=method,
        max_steps=6,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        caption_dropout=0.3,
        gradient_accumulation_steps=2,
    )
    straight = tmp_path / "straight"
    cfg = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], dataset, straight, extra, **settings)
    cfg.write_text(
        cfg.read_text().replace('resolution_type = "pixel"', 'resolution_type = "pixel"\nrandom_flip = true')
    )
    assert main(["train", str(cfg)]) == 0

    crashed = tmp_path / "crashed"
    (crashed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_00000003", crashed / "checkpoints" / "step_00000003")
    # a half-written checkpoint from the moment of the crash must be ignored
    (crashed / "checkpoints" / ".tmp-step_00000004").mkdir()
    args = ["train", str(cfg), "--set", f"output_dir={crashed}", "--set", f"cache.dir={straight / 'cache'}"]
    assert main([*args, "--resume", "latest"]) == 0

    if method == "lora":
        a = load_file(straight / "final" / "lora.safetensors")
        b = load_file(crashed / "final" / "lora.safetensors")
    else:
        a = load_file(straight / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
        b = load_file(crashed / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = read_metrics(crashed)
    assert [m["step"] for m in resumed] == [4, 5, 6]
    assert [m["loss"] for m in read_metrics(straight)][3:] == [m["loss"] for m in resumed]


def test_resume_refuses_changed_data_settings(tmp_path, tiny_models, dataset, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], dataset, out, max_steps=2)
    assert main(["train", str(cfg)]) == 0
    assert (
        main(["train", str(cfg), "--set", "train.batch_size=1", "--set", "train.max_steps=4", "--resume", "latest"])
        == 2
    )
    assert "train.batch_size" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["v1.1", "v1.2"])
def test_sample_matches_stock_pipeline(tmp_path, tiny_models, variant):
    from diffusers import HunyuanDiTPipeline

    model = tiny_models[variant]
    out = tmp_path / "sample.png"
    assert (
        main(
            [
                "sample",
                "--precision",
                "fp32",
                "--model",
                str(model),
                "--prompt",
                PROMPT,
                "--negative-prompt",
                "blurry",
                "--seed",
                "3",
                "--steps",
                "4",
                "--guidance",
                "4.5",
                "--width",
                "64",
                "--height",
                "96",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    stock = HunyuanDiTPipeline.from_pretrained(model)
    image = stock(
        PROMPT,
        negative_prompt="blurry",
        num_inference_steps=4,
        guidance_scale=4.5,
        width=64,
        height=96,
        use_resolution_binning=False,
        target_size=(64, 96),
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert read_image(out).shape == (96, 64, 3)
    assert np.array_equal(read_image(out), np.asarray(image))


def test_load_lora_matches_the_trained_model(tmp_path, tiny_models, dataset):
    """The in-training model, `dittune.load_lora` on a stock pipeline and `dittune sample --lora` agree exactly."""
    from diffusers import HunyuanDiTPipeline

    import dittune
    from dittune.config import load_config
    from dittune.models.hunyuan_dit.spec import rotary_embedding
    from dittune.train.setup import build_run, make_accelerator
    from dittune.train.trainer import Trainer

    out = tmp_path / "run"
    extra = f'[validation]\nprompts = ["{PROMPT}"]\nsteps = 3\nseed = 5\n[lora]\nrank = 4\nalpha = 2.0\n'
    cfg = load_config(
        write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], dataset, out, extra, max_steps=3, learning_rate=1e-2)
    )
    run = build_run(cfg, make_accelerator(cfg), progress=False, announce=lambda _: None)
    Trainer(run, progress=False).train()
    live = run.accelerator.unwrap_model(run.denoiser).eval()

    pipeline = dittune.load_lora(
        HunyuanDiTPipeline.from_pretrained(tiny_models["v1.2"]), out / "final" / "lora.safetensors"
    )
    loaded = pipeline.transformer.eval()
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([10.0, 700.0]),
        "encoder_hidden_states": torch.randn(2, 77, 32, generator=generator),
        "text_embedding_mask": torch.ones(2, 77, dtype=torch.long),
        "encoder_hidden_states_t5": torch.randn(2, 256, 32, generator=generator),
        "text_embedding_mask_t5": torch.ones(2, 256, dtype=torch.long),
        "image_rotary_emb": rotary_embedding(16, 8, 8, 2, torch.device("cpu")),
        "return_dict": False,
    }
    with torch.no_grad():
        expected, got = live(**inputs)[0], loaded(**inputs)[0]
        base = HunyuanDiTPipeline.from_pretrained(tiny_models["v1.2"]).transformer(**inputs)[0]
    assert torch.equal(expected, got)
    assert not torch.allclose(expected, base)  # the adapter really changes the output

    sample = tmp_path / "sample.png"
    assert (
        main(
            [
                "sample",
                "--precision",
                "fp32",
                "--model",
                str(tiny_models["v1.2"]),
                "--lora",
                str(out / "final" / "lora.safetensors"),
                "--prompt",
                PROMPT,
                "--seed",
                "5",
                "--steps",
                "3",
                "--guidance",
                "5",
                "--width",
                "64",
                "--height",
                "64",
                "--out",
                str(sample),
            ]
        )
        == 0
    )
    validation = next((out / "validation" / "step_00000003").glob("00-*.png"))
    assert np.array_equal(read_image(sample), read_image(validation))


def test_lora_learns_one_image(tmp_path, tiny_models):
    """A LoRA trained on one image/caption pulls sampled latents for that caption toward its latent."""
    from diffusers import HunyuanDiTPipeline
    from PIL import ImageDraw

    import dittune
    from dittune.cache.build import LATENT
    from dittune.cache.store import CacheStore
    from dittune.models.base import LossSettings, SampleMeta, TrainBatch
    from dittune.models.hunyuan_dit.spec import HunyuanDiTSpec

    data = tmp_path / "one"
    data.mkdir()
    image = Image.new("RGB", (64, 64), (30, 30, 220))
    ImageDraw.Draw(image).ellipse([16, 16, 48, 48], (220, 30, 30))
    image.save(data / "a.png")
    caption = "a red circle on a blue background"
    (data / "a.txt").write_text(caption)
    out = tmp_path / "run"
    model = tiny_models["v1.2"]
    cfg = write_config(
        tmp_path / "cfg.toml",
        model,
        data,
        out,
        "[checkpoint]\nevery_steps = 1000\n",
        max_steps=200,
        batch_size=1,
        learning_rate=1e-3,
    )
    assert main(["train", str(cfg)]) == 0

    (entry,) = CacheStore(out / "cache").entries(LATENT)
    moments = {k: v.unsqueeze(0) for k, v in load_file(entry).items()}
    target = moments["mean"][0] * 0.13025
    spec = HunyuanDiTSpec(model)
    base_pipe = HunyuanDiTPipeline.from_pretrained(model)
    tuned_pipe = dittune.load_lora(HunyuanDiTPipeline.from_pretrained(model), out / "final" / "lora.safetensors")

    # The loss falls: the objective at the same 64 (timestep, noise) draws, base vs tuned.
    (text,) = spec.encode_prompts(spec.load_text_encoders(torch.device("cpu"), torch.float32), [caption])
    batch = TrainBatch(moments, {k: v.unsqueeze(0) for k, v in text.items()}, [SampleMeta((64, 64), (64, 64), (0, 0))])

    def objective(pipeline) -> float:
        generator = torch.Generator().manual_seed(123)
        scheduler = spec.load_scheduler()
        with torch.no_grad():
            values = [
                spec.compute_loss(pipeline.transformer, scheduler, batch, generator, LossSettings()).loss
                for _ in range(64)
            ]
        return float(torch.stack(values).mean())

    assert objective(tuned_pipe) < 0.75 * objective(base_pipe)

    # Samples move toward the data: sampled latents for the caption, several seeds.
    def distances(pipeline) -> list[float]:
        pipeline.set_progress_bar_config(disable=True)
        result = []
        for seed in range(3):
            latent = pipeline(
                **spec.prompt_kwargs(caption, "", width=64, height=64),
                num_inference_steps=20,
                guidance_scale=1.0,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
            ).images[0]
            result.append(((latent - target) ** 2).mean().item())
        return result

    base, tuned = distances(base_pipe), distances(tuned_pipe)
    assert all(t < 0.7 * b for t, b in zip(tuned, base)), (base, tuned)


def test_cache_command_builds_then_reuses(tmp_path, tiny_models, dataset, capsys):
    (dataset / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (dataset / "broken.txt").write_text("a broken image")
    cfg = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], dataset, tmp_path / "run")
    assert main(["cache", str(cfg)]) == 0
    first = capsys.readouterr().out
    assert "latents: 0 cached, 8 encoded" in first and "broken.png" in first
    assert main(["cache", str(cfg)]) == 0
    second = capsys.readouterr().out
    assert (
        "latents: 8 cached, 0 encoded" in second and "text: 5 cached, 0 encoded" in second
    )  # 4 captions + the empty one


def test_adamw8bit_full_run_has_8bit_states_and_resumes(tmp_path, tiny_models, dataset):
    """bitsandbytes AdamW8bit (runs on CPU too): 8-bit moments for large tensors, exact resume."""
    extra = "[checkpoint]\nevery_steps = 2\nkeep_last = 5\n"
    straight = tmp_path / "straight"
    cfg = write_config(
        tmp_path / "cfg.toml",
        tiny_models["v1.2"],
        dataset,
        straight,
        extra,
        method="full",
        optimizer="adamw8bit",
        learning_rate=1e-3,
    )
    assert main(["train", str(cfg)]) == 0
    state = load_tree(straight / "checkpoints" / "step_00000004", "training_state")["optimizer"]["state"]

    def dtypes(value: object) -> set[torch.dtype]:
        if torch.is_tensor(value):
            return {value.dtype}
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else []
        return set().union(*(dtypes(child) for child in children))

    found = dtypes(state)
    assert torch.uint8 in found and torch.float32 in found, found

    crashed = tmp_path / "crashed"
    shutil.copytree(straight / "checkpoints" / "step_00000002", crashed / "checkpoints" / "step_00000002")
    args = ["train", str(cfg), "--set", f"output_dir={crashed}", "--set", f"cache.dir={straight / 'cache'}"]
    assert main([*args, "--resume", "latest"]) == 0
    name = "final/transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(straight / name), load_file(crashed / name)
    assert all(torch.equal(a[k], b[k]) for k in a)
