"""`dittune estimate`: the estimate (fake weights, nothing loaded) against measured runs of the real code on real
weights, per phase, on tiny and mid-size models of an image family (SD3) and a video family (Wan), and on a tiny
Hunyuan-DiT ControlNet run; exact parameter bytes; the command's table and JSON; clear errors before anything
loads; options it cannot trace; and the per-phase memory in metrics.jsonl.

Measured: caching is `fill_caches`, training the second `Trainer.optimizer_step` and validation `Trainer.validate`,
each under the same live-tensor meter (`dittune.train.memory`). The mid-size models' training step is also
measured by glibc's allocator (`mallinfo2`), independently of the meter.
"""

from __future__ import annotations

import ctypes
import gc
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_dataset, make_video_dataset, write_config
from dittune.cli.main import main
from dittune.config import load_config
from dittune.train.estimate import (
    CONTROLNET,
    CONTROLNET_FROZEN,
    FROZEN,
    OPTIMIZER,
    TEXT_ENCODERS,
    TRAINABLE,
    VAE,
    estimate,
)
from dittune.train.memory import module_tensors, modules_in, storage_bytes, trace
from dittune.train.optim import optimizer_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 0.25
VALIDATION = '[validation]\nprompts = ["a red ball"]\nnegative_prompt = "blurry"\nsteps = 2\n'
MID = {
    "sd3": ({"num_layers": 6, "num_attention_heads": 8, "attention_head_dim": 32, "caption_projection_dim": 256},
            {"block_out_channels": [64, 64, 64, 64]}),
    "wan": ({"num_layers": 6, "num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 512}, {"base_dim": 16}),
}  # fmt: skip
"""family → (transformer, VAE) config changes of the mid-size model: wider and deeper than the tiny one."""
CASES = {
    "sd3-tiny": ("sd3", False, ["data.resolution=64"]),
    "sd3-mid": ("sd3", True, ["data.resolution=128"]),
    "wan-tiny": ("wan", False, ["data.frames=9"]),
    "wan-mid": ("wan", True, ["data.frames=9", "data.resolution=96"]),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny and mid-size SD3 and Wan folders (the mid-size ones: the tiny one with larger transformer and VAE)."""
    from dittune.models.registry import tiny_builder

    root = tmp_path_factory.mktemp("estimate-models")
    found = {}
    for family in MID:
        found[f"{family}-tiny"] = tiny_builder(family)(root / family, seed=0)
        found[f"{family}-mid"] = _scaled(found[f"{family}-tiny"], root / f"{family}-mid", family)
    return found


def _scaled(tiny: Path, out: Path, family: str) -> Path:
    import diffusers

    from dittune.models.registry import spec_class

    shutil.copytree(tiny, out)
    spec = spec_class(family)
    for part, class_name, changes in zip(("transformer", "vae"), (spec.denoiser_class, spec.vae_class), MID[family]):
        cls = getattr(diffusers, class_name)
        config = {**cls.load_config(out / part), **changes}
        shutil.rmtree(out / part)
        torch.manual_seed(0)
        cls.from_config(config).save_pretrained(out / part)
    return out


def _config(tmp: Path, models: dict[str, Path], case: str, *overrides: str) -> Any:
    family, _, settings = CASES[case]
    data = tmp / "data"
    if family == "wan":
        make_video_dataset(data, frames=9)
    else:
        make_dataset(data)
    path = write_config(tmp / "cfg.toml", models[case], data, tmp / "out", VALIDATION, family=family)
    return load_config(path, [*settings, *overrides])


# ---------------------------------------------------------------------------------------- measured
class _Allocator(TorchDispatchMode):
    """glibc's bytes in use (`mallinfo2`: arena + mmapped chunks) after every aten op: its peak above the start."""

    class _Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        self.mallinfo2.restype = self._Info
        self.start = self.peak = self.live()

    def live(self) -> int:
        info = self.mallinfo2()
        return int(info.uordblks + info.hblkhd)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.live())
        return out


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


def _measure(cfg: Any) -> dict[str, Any]:
    """Peaks of the real run's phases (and its parameter bytes), each under the live-tensor meter."""
    from dittune.train.prepare import fill_caches
    from dittune.train.setup import build_run, load_spec, make_accelerator
    from dittune.train.trainer import Trainer

    spec, _ = load_spec(cfg)
    cpu = torch.device("cpu")
    caching, _ = trace(
        "caching",
        lambda: fill_caches(cfg, spec, device=cpu, compute_dtype="fp32", keep_vae=False, progress=False),
        {},
    )
    encoders = spec.load_text_encoders(cpu, torch.float32)
    weights = {TEXT_ENCODERS: storage_bytes(module_tensors(modules_in(encoders)))}
    del encoders
    run = build_run(cfg, make_accelerator(cfg), progress=False, announce=lambda _: None)
    trainer = Trainer(run, progress=False)
    trainer.optimizer_step()  # the optimizer's state exists from the first step on
    model = run.accelerator.unwrap_model(run.denoiser)
    trainable = {id(p) for p in run.trainable}
    if cfg.train.method == "controlnet":  # the frozen denoiser; the ControlNet's frozen and trained parts
        controlnet = [t for t in module_tensors([model.controlnet]) if id(t) not in trainable]
        parts = {FROZEN: module_tensors([model.denoiser]), CONTROLNET_FROZEN: controlnet, CONTROLNET: run.trainable}
    else:
        parts = {FROZEN: [t for t in module_tensors([model]) if id(t) not in trainable], TRAINABLE: run.trainable}
    resident = {**parts, OPTIMIZER: optimizer_tensors(run.optimizer)}
    resident[VAE] = module_tensors([run.vae])  # kept on the CPU for validation
    weights[VAE] = storage_bytes(resident[VAE])
    weights.update({label: storage_bytes(tensors) for label, tensors in parts.items() if tensors})
    gc.collect()
    allocator = _Allocator() if _has_mallinfo2() else None

    def step() -> Any:
        if allocator is None:
            return trainer.optimizer_step()
        with allocator:
            return trainer.optimizer_step()

    training, (loss, logs, samples) = trace("training", step, resident, gradients_of=run.trainable)
    validation, _ = trace("validation", trainer.validate, resident)
    trainer.step = 2
    trainer.log_step(loss, logs, samples, 0.0)
    metrics = json.loads((cfg.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    above = None if allocator is None else allocator.peak - allocator.start
    return {"caching": caching, "training": training, "validation": validation, "weights": weights,
            "allocator": above, "metrics": metrics}  # fmt: skip


def _close(estimated: int | None, measured: int, what: str) -> None:
    assert estimated is not None, f"{what}: not estimated"
    assert abs(estimated - measured) <= TOLERANCE * measured, f"{what}: estimated {estimated}, measured {measured}"


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_matches_measured_run(tmp_path: Path, models: dict[str, Path], case: str) -> None:
    cfg = _config(tmp_path, models, case)
    est = estimate(cfg, "cpu")
    assert est.precision == "fp32" and est.not_modelled == []
    measured = _measure(cfg)
    assert est.weights == measured["weights"]  # parameter bytes by dtype: exact
    for phase in ("caching", "training", "validation"):
        _close(est.phase(phase).peak, measured[phase].peak, f"{case} {phase}")
    stage = est.phase("training").worst
    assert stage is not None and stage.at_peak[OPTIMIZER] == measured["training"].at_peak[OPTIMIZER]
    if CASES[case][1] and measured["allocator"] is not None:  # mid-size: what the step adds, by the allocator
        added = stage.peak - sum(v for k, v in stage.at_peak.items() if k in (FROZEN, TRAINABLE, OPTIMIZER, VAE))
        _close(added, measured["allocator"], f"{case} training step (allocator)")
    line = measured["metrics"]
    assert {"memory_caching_mb", "memory_step_mb", "memory_validation_mb"} <= line.keys()
    assert line["peak_memory_mb"] >= max(line["memory_step_mb"], line["memory_validation_mb"]) > 0


def _control_config(tmp: Path, model: Path, *overrides: str) -> Any:
    """A ControlNet run on circles whose control images are their inverses (`<stem>_control.png`)."""
    from PIL import Image, ImageOps

    data = make_dataset(tmp / "data", sizes=((64, 64), (96, 64)), colours=("red", "blue"))
    for image in sorted(data.glob("*.png")):
        ImageOps.invert(Image.open(image).convert("RGB")).save(image.with_name(f"{image.stem}_control.png"))
    validation = VALIDATION + f'control_images = ["{data / "red_0_control.png"}"]\n'
    path = write_config(tmp / "cfg.toml", model, data, tmp / "out", validation, method="controlnet")
    return load_config(path, list(overrides))


def test_controlnet_estimate_matches_measured_run(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """A Hunyuan-DiT ControlNet run: the frozen denoiser, the ControlNet (fp32; its embedders frozen, the rest
    trained, with gradients and optimizer state), the control latents in the batch and the ControlNet pipeline."""
    cfg = _control_config(tmp_path, tiny_models["v1.2"])
    est = estimate(cfg, "cpu")
    assert est.not_modelled == [] and all(phase.problem is None for phase in est.phases)
    measured = _measure(cfg)
    assert est.weights == measured["weights"]  # parameter bytes by component and dtype: exact
    assert set(est.weights) >= {FROZEN, CONTROLNET_FROZEN, CONTROLNET} and TRAINABLE not in est.weights
    for phase in ("caching", "training", "validation"):
        _close(est.phase(phase).peak, measured[phase].peak, f"controlnet {phase}")
    stage = est.phase("training").worst
    assert stage is not None and stage.at_peak[OPTIMIZER] == measured["training"].at_peak[OPTIMIZER]

    # On a GPU (bf16 assumed here): the denoiser in bf16, the whole ControlNet in fp32, trained parameters with
    # fp32 AdamW moments.
    from dittune.models.hunyuan_dit.spec import HunyuanDiTSpec

    gpu = estimate(_control_config(tmp_path / "gpu", tiny_models["v1.2"], "train.mixed_precision=auto"), "cuda")
    assert gpu.weight_dtype == "bf16"
    spec = HunyuanDiTSpec(tiny_models["v1.2"])
    _, trained = spec.build_controlnet(spec.load_denoiser(torch.float32), None)
    count = sum(p.numel() for p in trained)
    assert gpu.weights[CONTROLNET] == {"float32": 4 * count} and set(gpu.weights[CONTROLNET_FROZEN]) == {"float32"}
    assert set(gpu.weights[FROZEN]) == {"bfloat16"}
    assert gpu.phase("training").worst.at_peak[OPTIMIZER] >= 2 * 4 * count


def _layout(spec: Any, dtype: torch.dtype) -> dict[str, tuple[Any, ...]]:
    """name → (shape, dtype, fake?) of every parameter and buffer of the text encoders, VAE and denoiser."""
    from torch._subclasses.fake_tensor import FakeTensor

    cpu = torch.device("cpu")
    parts = [*modules_in(spec.load_text_encoders(cpu, dtype)), spec.load_vae(cpu, dtype), spec.load_denoiser(dtype)]
    named = ((f"{i}.{n}", t) for i, m in enumerate(parts) for n, t in (*m.named_parameters(), *m.named_buffers()))
    return {name: (tuple(t.shape), t.dtype, isinstance(t, FakeTensor)) for name, t in named}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weightless_models_match_loaded_ones(models: dict[str, Path], dtype: torch.dtype) -> None:
    """Every parameter and buffer has the name, shape and dtype `from_pretrained` gives it (keep-in-fp32 rules of
    diffusers and transformers included), and none holds data."""
    from dittune.models.registry import spec_class
    from dittune.train.weightless import weightless

    for case in ("sd3-tiny", "wan-tiny"):
        spec = spec_class(CASES[case][0])(models[case])
        real = _layout(spec, dtype)
        with weightless():
            fake = _layout(spec, dtype)
        assert {k: v[:2] for k, v in fake.items()} == {k: v[:2] for k, v in real.items()}, case
        assert not any(v[2] for v in real.values()) and all(v[2] for v in fake.values())


# ---------------------------------------------------------------------------------------- command
def _header_only(model: Path) -> None:
    """Cut every weight file down to its header: the shapes stay readable, the weights are gone."""
    for file in model.rglob("*.safetensors"):
        data = file.read_bytes()
        file.write_bytes(data[: 8 + int.from_bytes(data[:8], "little")])


def test_command_prints_table_and_json_without_weights(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    hollow = tmp_path / "hollow"
    shutil.copytree(models["wan-tiny"], hollow)
    _header_only(hollow)
    cfg = _config(tmp_path, {"wan-tiny": hollow}, "wan-tiny")
    path = str(tmp_path / "cfg.toml")
    assert main(["estimate", path, "--set", "data.frames=9", "--set", "train.gradient_checkpointing=true"]) == 0
    table = capsys.readouterr().out
    for expected in ("caching", "training", "validation", "peak", "denoiser (trainable)", "no weights loaded",
                     "9 frames", "CUDA"):  # fmt: skip
        assert expected in table, expected
    assert main(["estimate", path, "--device", "cpu", "--json", "--set", "data.frames=9"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cpu" and report["precision"] == "fp32"
    assert set(report["phases"]) == {"caching", "training", "validation"}
    peaks = {name: phase["peak_bytes"] for name, phase in report["phases"].items()}
    assert peaks == {phase.name: phase.peak for phase in estimate(cfg, "cpu").phases}
    with pytest.raises(Exception):  # noqa: B017 - the real run cannot load these folders' weights
        _measure(cfg)


def test_config_problems_reported_before_loading(tmp_path: Path, capsys) -> None:
    data = make_dataset(tmp_path / "data")
    missing = tmp_path / "no-model"
    path = write_config(tmp_path / "cfg.toml", missing, data, tmp_path / "out", family="sd3")
    assert main(["estimate", str(path)]) == 1
    error = capsys.readouterr().err
    assert "model.path" in error and str(missing) in error


def test_options_it_cannot_trace_are_named(tmp_path: Path, models: dict[str, Path]) -> None:
    pytest.importorskip("prodigyopt")
    cfg = _config(tmp_path, models, "sd3-tiny", 'train.optimizer="prodigy"', "train.learning_rate=1.0",
                  "train.compile=true")  # fmt: skip
    est = estimate(cfg, "cpu")
    notes = " ".join(est.not_modelled)
    assert "prodigy" in notes and "train.compile" in notes
    assert all(phase.peak for phase in est.phases)  # the rest is still estimated
    assert OPTIMIZER not in est.phase("training").worst.at_peak
