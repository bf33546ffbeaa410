"""The result does not depend on how a global batch is split: 1 process × batch 4, 2 processes × batch 2 and
1 process × batch 2 × accumulation 2 end with the same weights (fp32), for LoRA and full training on an image
and a video family. Every random number (noise, noise level, posterior draw, flip, caption dropout, LTX's
first-frame condition) is keyed by (seed, step, position in the global batch), and the data order by the
global batch; resuming with another split continues the same run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_dataset, make_video_dataset, write_config
from dittune.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {"sd3": "image", "ltx-video": "video"}
SPLITS = {"1x4": dict(batch_size=4), "1x2x2": dict(batch_size=2, gradient_accumulation_steps=2)}
COMMON = dict(max_steps=3, caption_dropout=0.3, learning_rate=1e-3, lr_scheduler="cosine", max_grad_norm=0.5)


def _torchrun(commands: list[list[str]], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Every `dittune` command in `commands`, one after the other, in the same 2 processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    script = cwd / "several_runs.py"
    script.write_text(f"import sys\nfrom dittune.cli.main import main\nsys.exit(max(main(c) for c in {commands!r}))\n")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    return subprocess.run(launch, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _weights(run: Path, method: str) -> dict[str, torch.Tensor]:
    if method == "lora":
        return load_file(run / "final" / "lora.safetensors")
    (file,) = (run / "final").glob("transformer/*.safetensors")
    return load_file(file)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], label: str) -> None:
    assert a.keys() == b.keys(), label
    for key in a:
        difference = (a[key] - b[key]).abs().max().item()
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=2e-6), f"{label} {key}: max difference {difference:.3g}"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("split-data")
    return {"image": make_dataset(root / "images"), "video": make_video_dataset(root / "clips", colours=COLOURS)}


COLOURS = ("red", "blue", "green", "yellow")


@pytest.mark.parametrize("family", list(CASES))
def test_every_split_of_the_global_batch_trains_the_same_weights(
    family: str, data, family_models, video_models, tmp_path: Path
) -> None:
    model = video_models[family] if CASES[family] == "video" else family_models[family]
    extra = f'[cache]\ndir = "{tmp_path / "cache"}"\n[checkpoint]\nevery_steps = 1\n'
    configs: dict[tuple[str, str], Path] = {}
    for method in ("lora", "full"):
        for name, split in {**SPLITS, "2x2": dict(batch_size=2)}.items():
            out = tmp_path / f"{method}-{name}"
            configs[method, name] = write_config(
                tmp_path / f"{method}-{name}.toml",
                model,
                data[CASES[family]],
                out,
                extra,
                family=family,
                method=method,
                **COMMON,
                **split,
            )
            clips = "frames = 9\n" if CASES[family] == "video" else ""
            text = configs[method, name].read_text().replace("[data]\n", f"[data]\nrandom_flip = true\n{clips}")
            configs[method, name].write_text(text)
    for (_, name), cfg in configs.items():
        if name != "2x2":
            assert main(["train", str(cfg)]) == 0
    result = _torchrun([["train", str(configs[m, "2x2"])] for m in ("lora", "full")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for method in ("lora", "full"):
        reference = _weights(tmp_path / f"{method}-1x4", method)
        assert any(v.abs().max() > 0 for v in reference.values())
        for name in ("1x2x2", "2x2"):
            _assert_same(reference, _weights(tmp_path / f"{method}-{name}", method), f"{family} {method} {name}")

    # A run checkpointed by 2 processes resumes in 1 process with accumulation 2 (the same global batch) and ends
    # where the uninterrupted runs ended.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "lora-2x2" / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    args = ["train", str(configs["lora", "1x2x2"]), "--set", f"output_dir={resumed}", "--resume", "latest"]
    assert main(args) == 0
    _assert_same(_weights(tmp_path / "lora-1x4", "lora"), _weights(resumed, "lora"), f"{family} resumed 2→1")

    # Also from an odd step of a run without accumulation: accelerate's micro-batch counter must not carry over
    # (1 step of batch 4 is 1 micro-batch; with accumulation 2 it would put every sync on a step's first half).
    odd = tmp_path / "resumed-odd"
    shutil.copytree(tmp_path / "lora-1x4" / "checkpoints" / "step_00000001", odd / "checkpoints" / "step_00000001")
    assert main([*args[:3], f"output_dir={odd}", "--resume", "latest"]) == 0
    _assert_same(_weights(tmp_path / "lora-1x4", "lora"), _weights(odd, "lora"), f"{family} resumed at step 1 1→1x2")


def test_resuming_with_another_global_batch_is_refused(family_models, data, tmp_path: Path, capsys) -> None:
    cfg = write_config(
        tmp_path / "a.toml",
        family_models["sd3"],
        data["image"],
        tmp_path / "run",
        family="sd3",
        max_steps=1,
        batch_size=2,
    )
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    args = ["train", str(cfg), "--set", "train.max_steps=2", "--set", "train.batch_size=1", "--resume", "latest"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "train.batch_size" in err and "took 2 samples per step" in err and "this run takes 1" in err

    # A sharded engine's checkpoint (here marked as FSDP's) resumes only under the same launch.
    (state_file,) = (tmp_path / "run" / "checkpoints").glob("step_*/trainer_state.json")
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "engine": "fsdp", "processes": 2}))
    assert main(["train", str(cfg), "--set", "train.max_steps=2", "--resume", "latest"]) != 0
    assert "was written by 2 process(es) with fsdp; this run has 1 with ddp" in capsys.readouterr().err
