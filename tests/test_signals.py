"""Runs that are signalled or whose newest checkpoint is damaged lose nothing but the current step.

A real `dittune train` process gets SIGINT / SIGTERM mid-run: it finishes the step, writes a checkpoint, says how
to resume and exits 128 + the signal; resuming gives the uninterrupted run's weights bit for bit. A damaged newest
checkpoint is named and passed over by `--resume latest`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import write_config

from dittune.cli.main import main

STEPS = 40


def _config(tmp_path: Path, model: Path, data: Path, out: Path, **train: object) -> Path:
    extra = "[checkpoint]\nevery_steps = 1000\n"
    settings = {"max_steps": STEPS, "log_every_steps": 1, "caption_dropout": 0.2, **train}
    return write_config(tmp_path / f"{out.name}.toml", model, data, out, extra, **settings)


def _start(config: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "dittune", "train", str(config)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(out: Path, steps: int, process: subprocess.Popen[str]) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()}")
        time.sleep(0.05)
    raise AssertionError("the run did not reach the step in time")


def _lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "lora.safetensors")


@pytest.fixture(scope="module")
def straight(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.conftest import make_dataset

    root = tmp_path_factory.mktemp("signals")
    data = make_dataset(root / "data")
    out = root / "straight"
    assert main(["train", str(_config(root, tiny_models["v1.2"], data, out))]) == 0
    return data, out


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_step_and_resume_is_bit_identical(
    straight: tuple[Path, Path], tiny_models: dict[str, Path], tmp_path: Path, number: int
) -> None:
    data, uninterrupted = straight
    out = tmp_path / "signalled"
    config = _config(tmp_path, tiny_models["v1.2"], data, out)
    process = _start(config)
    _wait_for_steps(out, 3, process)
    process.send_signal(number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + number, stderr[-2000:]
    name = signal.Signals(number).name
    assert f"stopped: {name} after step" in stderr and "--resume latest" in stderr
    stopped_at = int(stderr.split(f"{name} after step ")[1].split(";")[0])
    assert 3 <= stopped_at < STEPS
    state = json.loads((out / "checkpoints" / f"step_{stopped_at:08d}" / "trainer_state.json").read_text())
    assert state["step"] == stopped_at
    assert not (out / "final").exists()

    assert main(["train", str(config), "--set", f"cache.dir={uninterrupted / 'cache'}", "--resume", "latest"]) == 0
    want, got = _lora(uninterrupted), _lora(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_second_ctrl_c_quits_at_once(straight: tuple[Path, Path], tiny_models: dict[str, Path], tmp_path: Path):
    data, _ = straight
    out = tmp_path / "twice"
    process = _start(_config(tmp_path, tiny_models["v1.2"], data, out, max_steps=100000))
    _wait_for_steps(out, 2, process)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    for folder in (out / "checkpoints").glob("step_*"):  # a complete checkpoint, or none: never a half one
        assert (folder / "trainer_state.json").is_file()


def test_resume_latest_passes_over_a_damaged_checkpoint(
    straight: tuple[Path, Path], tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, uninterrupted = straight
    out = tmp_path / "damaged"
    config = _config(tmp_path, tiny_models["v1.2"], data, out)
    config.write_text(config.read_text().replace("every_steps = 1000", "every_steps = 10\nkeep_last = 5"))
    cache = ["--set", f"cache.dir={uninterrupted / 'cache'}"]
    assert main(["train", str(config), *cache, "--set", "train.max_steps=20"]) == 0
    newest = out / "checkpoints" / "step_00000020"
    victim = next(p for p in sorted(newest.iterdir()) if p.suffix in (".pkl", ".bin", ".safetensors"))
    victim.write_bytes(victim.read_bytes()[:-7])
    capsys.readouterr()
    assert main(["train", str(config), *cache, "--resume", str(newest)]) == 2
    assert "damaged" in capsys.readouterr().err
    assert main(["train", str(config), *cache, "--resume", "latest"]) == 0
    out_text = capsys.readouterr().out
    assert f"checkpoint {newest} is damaged ({victim.name} has" in out_text
    assert "step_00000010" in out_text  # resumed from the intact one
    want, got = _lora(uninterrupted), _lora(out)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_two_processes_stop_together_on_sigterm(
    straight: tuple[Path, Path], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """torchrun passes SIGTERM to both processes: they stop after the same step, write one checkpoint together and
    exit with 143."""
    data, uninterrupted = straight
    out = tmp_path / "two"
    config = _config(tmp_path, tiny_models["v1.2"], data, out, batch_size=1, max_steps=100000)
    config.write_text(
        config.read_text().replace("[checkpoint]", f'[cache]\ndir = "{uninterrupted / "cache"}"\n[checkpoint]')
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    process = subprocess.Popen(
        [*command, "-m", "dittune", "train", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    _wait_for_steps(out, 3, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert stderr.count("stopped: SIGTERM after step") == 2, stderr[-3000:]
    steps = {int(part.split(";")[0]) for part in stderr.split("SIGTERM after step ")[1:]}
    assert len(steps) == 1, steps  # both processes stopped after the same step
    (step,) = steps
    checkpoint = out / "checkpoints" / f"step_{step:08d}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["processes"] == 2
