"""`train.on_nonfinite`: a NaN or infinite loss or gradient norm stops the run (never writing non-finite weights)
or skips the step (weights, optimizer state and LR schedule untouched), through `dittune train` on the tiny
Hunyuan-DiT."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_dataset, read_metrics, write_config
from dittune.cli.main import main
from dittune.models.hunyuan_dit.spec import HunyuanDiTSpec
from dittune.train.state_io import load_tree
from test_loss_logging import device_read_backs, read_backs

pytestmark = pytest.mark.usefixtures("one_thread")

CHECKPOINT_EVERY_STEP = "[checkpoint]\nevery_steps = 1\nkeep_last = 10\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two images of one bucket: one batch of 2 per step."""
    return make_dataset(tmp_path_factory.mktemp("nonfinite-data"), sizes=((64, 64),), colours=("red", "blue"))


def checkpoint_leaves(folder: Path) -> dict[str, Any]:
    """Every value dittune's checkpoint holds (weights, optimizer and scheduler state, …) by a flat key; RNG
    states left out (they are not weights and advance with every step)."""
    leaves: dict[str, Any] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                flatten(f"{prefix}/{key}", item)
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                flatten(f"{prefix}/{index}", item)
        else:
            leaves[prefix] = value

    state_files = {"training_state.json", "training_state.safetensors"}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("rng_state") or path.name in state_files:
            continue
        if path.suffix == ".safetensors":
            flatten(path.name, load_file(path))
        elif path.suffix == ".json":
            flatten(path.name, json.loads(path.read_text()))
    if (folder / "training_state.json").is_file():  # a checkpoint (not the exported final weights)
        flatten("training_state", load_tree(folder, "training_state"))
    assert len(leaves) > 10, sorted(leaves)
    return leaves


def assert_finite(folder: Path) -> int:
    """Every tensor and number under `folder` is finite; returns how many tensors were checked."""
    leaves = checkpoint_leaves(folder)
    tensors = {key: value for key, value in leaves.items() if isinstance(value, torch.Tensor)}
    for key, value in tensors.items():
        assert torch.isfinite(value.float()).all(), f"{folder.name}: {key} is not finite"
    for key, value in leaves.items():
        assert not (isinstance(value, float) and not math.isfinite(value)), f"{folder.name}: {key} = {value}"
    return len(tensors)


def inject_nan(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> list[int]:
    """Make the loss NaN at the given steps (one loss per step here: batch 2, no accumulation, one process),
    as a bad sample or a numerical blow-up would; returns the list of steps computed so far."""
    computed: list[int] = []
    compute_loss = HunyuanDiTSpec.compute_loss

    def loss_with_nan(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = compute_loss(self, *args, **kwargs)
        computed.append(len(computed) + 1)
        if computed[-1] in steps:
            out = dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(HunyuanDiTSpec, "compute_loss", loss_with_nan)
    return computed


def test_stop_keeps_the_last_good_checkpoint(tmp_path, tiny_models, data, capsys):
    """A learning rate of 1e12 blows the loss up at step 2: the run stops there with exit status 1, names the
    step and the step-1 checkpoint, writes no checkpoint or final weights after it."""
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "cfg.toml", tiny_models["v1.2"], data, out, CHECKPOINT_EVERY_STEP, learning_rate=1e12,
        max_steps=5, log_every_steps=4,
    )  # fmt: skip
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    good = out / "checkpoints" / "step_00000001"
    assert "stopped: step 2: the loss or gradient norm is not finite" in err
    assert f"The last good checkpoint is {good} (step 1)" in err and "train.learning_rate (now 1e+12)" in err
    assert f"--resume {good} --set train.on_nonfinite=skip`" in err
    assert "Traceback" not in err
    assert not (out / "final").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]
    assert assert_finite(good) > 10  # adapter weights and AdamW moments, all finite
    assert not (out / "metrics.jsonl").exists() or read_metrics(out) == []  # step 4, the first logged, never came


def test_stop_on_an_overflowing_update(tmp_path, tiny_models, data, capsys):
    """A learning rate past float32's range makes the weights infinite while the step's loss and grad norm are
    finite: caught by the weight check before the first checkpoint."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], data, out, learning_rate=1e39, max_steps=3)
    assert main(["train", str(cfg), "--set", "checkpoint.every_steps=1"]) == 1
    err = capsys.readouterr().err
    assert "stopped: step 1: the trainable weights are not finite" in err
    assert "No checkpoint was written before it" in err
    assert not (out / "final").exists() and not list((out / "checkpoints").glob("step_*"))
    assert [line["step"] for line in read_metrics(out)] == [1]  # the loss of step 1 itself was finite
    assert math.isfinite(read_metrics(out)[0]["loss"])


def test_skip_leaves_weights_and_optimizer_untouched(tmp_path, tiny_models, data, monkeypatch):
    """A NaN loss at step 2 in "skip" mode: checkpoint 2 holds exactly checkpoint 1's weights, optimizer state
    and LR schedule; the run goes on, counts the skip and ends with finite weights."""
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "cfg.toml", tiny_models["v1.2"], data, out, CHECKPOINT_EVERY_STEP, on_nonfinite="skip",
        max_steps=4, lr_scheduler="linear", learning_rate=1e-3,
    )  # fmt: skip
    computed = inject_nan(monkeypatch, {2})
    assert main(["train", str(cfg)]) == 0
    assert computed == [1, 2, 3, 4]
    lines = read_metrics(out)
    assert [line["nonfinite_skips"] for line in lines] == [0, 1, 1, 1]
    assert math.isnan(lines[1]["loss"]) and all(math.isfinite(line["loss"]) for line in lines[::2])
    lrs = [line["lr"] for line in lines]
    assert lrs[1] == lrs[0] > lrs[2] > lrs[3]  # the schedule did not advance at the skipped step

    first, second = (checkpoint_leaves(out / "checkpoints" / f"step_{s:08d}") for s in (1, 2))
    tensors = [key for key, value in first.items() if isinstance(value, torch.Tensor)]
    assert any(key.startswith("adapter") for key in tensors) and any("exp_avg_sq" in key for key in tensors)
    assert [key for key in tensors if not torch.equal(first[key], second[key])] == []  # incl. Adam's step count
    third = checkpoint_leaves(out / "checkpoints" / "step_00000003")
    assert any(not torch.equal(first[key], third[key]) for key in tensors)  # step 3 trained again
    assert_finite(out / "checkpoints" / "step_00000004")
    assert assert_finite(out / "final") > 0


def test_skip_stops_after_max_in_a_row(tmp_path, tiny_models, data, capsys):
    """With learning_rate = 1e12 every step from step 2 on is NaN: "skip" gives up after max_nonfinite_skips."""
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "cfg.toml", tiny_models["v1.2"], data, out, CHECKPOINT_EVERY_STEP, learning_rate=1e12,
        on_nonfinite="skip", max_nonfinite_skips=2, max_steps=6,
    )  # fmt: skip
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "stopped: steps 2–3: 2 non-finite steps in a row" in err and "train.max_nonfinite_skips = 2" in err
    assert f"--resume {out / 'checkpoints' / 'step_00000001'}` and a smaller train.max_grad_norm" in err
    assert not (out / "final").exists()
    assert [line["nonfinite_skips"] for line in read_metrics(out)] == [0, 1]
    for folder in (out / "checkpoints").glob("step_*"):
        assert_finite(folder)


def test_stop_mode_reads_back_only_at_checks(tmp_path, tiny_models, data, monkeypatch):
    """The "stop" mode adds no read-back to a step: a NaN at step 1 is only noticed at the logged step 3, in the same
    single read-back as the metrics, and the message names step 1."""
    from dittune.config import load_config
    from dittune.errors import RunStopped
    from dittune.train.setup import build_run, make_accelerator
    from dittune.train.trainer import Trainer

    path = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], data, tmp_path / "run", log_every_steps=3)
    cfg = load_config(path)
    run = build_run(cfg, make_accelerator(cfg), progress=False, announce=lambda _: None)
    trainer = Trainer(run, progress=False)
    inject_nan(monkeypatch, {1})
    for _ in range(2):
        with read_backs(monkeypatch) as seen:
            trainer.optimizer_step()
            trainer.step += 1
        assert device_read_backs(seen) == []
    loss, logs, samples = trainer.optimizer_step()
    trainer.step += 1
    with read_backs(monkeypatch) as seen, pytest.raises(RunStopped) as stopped:
        trainer.log_step(loss, logs, samples, started=0.0)
    assert device_read_backs(seen) == [("tolist", "trainer.py", "read_numbers", True)]
    assert str(stopped.value).startswith("step 1: the loss or gradient norm is not finite")
    assert stopped.value.exit_status == 1
    assert read_metrics(cfg.output_dir)[-1]["step"] == 3  # the line is written before stopping
    with pytest.raises(RunStopped, match=r"^step 1: "):  # and the export refuses too
        trainer.export()
    assert not (cfg.output_dir / "final").exists()


def test_skip_is_refused_under_deepspeed(tmp_path, tiny_models, data):
    """DeepSpeed's engine steps inside backward, before a step could be skipped: refused at start-up."""
    from dittune.config import load_config
    from dittune.train.sharding import engine_problems

    path = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], data, tmp_path / "run", on_nonfinite="skip")
    assert "train.on_nonfinite" in dict(engine_problems(load_config(path), "deepspeed"))
    assert "train.on_nonfinite" not in dict(engine_problems(load_config(path), "fsdp"))
    assert "train.on_nonfinite" not in dict(
        engine_problems(load_config(path, ["train.on_nonfinite=stop"]), "deepspeed")
    )
