"""What a resume may change: changed data content is refused (naming the files), a changed learning rate or
weight decay is honoured from the resumed step on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from tests.conftest import make_dataset, read_metrics, write_config

from dittune.cli.main import main
from dittune.config import load_config
from dittune.train.checkpoint import STATE_FILE
from dittune.train.resume_changes import apply_changed_hyperparameters, data_changes, set_base_learning_rate

pytestmark = pytest.mark.usefixtures("one_thread")


def _latent_entries(out: Path) -> int:
    return len(list((out / "cache" / "latents").glob("*/*.safetensors")))


def test_changed_data_is_refused_until_restored(tiny_models, tmp_path, capsys) -> None:
    data = make_dataset(tmp_path / "data", sizes=((64, 64),), colours=("red", "blue"))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], data, out, max_steps=1)
    assert main(["train", str(cfg)]) == 0
    state = json.loads((out / "checkpoints" / "step_00000001" / STATE_FILE).read_text())
    assert sorted(state["data_fingerprint"]["samples"]) == ["blue_0.png", "red_0.png"]
    originals = {name: (data / name).read_bytes() for name in ("red_0.png", "blue_0.txt")}
    encoded = _latent_entries(out)

    image = Image.open(data / "red_0.png").convert("RGB")
    image.putpixel((0, 0), (0, 0, 0))  # one pixel; same size, same name
    image.save(data / "red_0.png")
    (data / "blue_0.txt").write_text("a blue square")
    shutil.copy(data / "red_0.png", data / "green_0.png")
    (data / "green_0.txt").write_text("a green circle")
    capsys.readouterr()
    resume = ["train", str(cfg), "--set", "train.max_steps=2", "--resume", "latest"]
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert "3 sample(s) differ" in err and "step_00000001" in err
    assert "blue_0.png (caption changed)" in err and "green_0.png (new)" in err and "red_0.png (content changed)" in err
    assert "Restore the data" in err and "another output_dir" in err and "Traceback" not in err
    assert _latent_entries(out) == encoded  # refused before anything was encoded (or the model loaded)
    assert not (out / "checkpoints" / "step_00000002").exists()

    for name, content in originals.items():  # restored: new modification times, the same content
        (data / name).write_bytes(content)
    for name in ("green_0.png", "green_0.txt"):
        (data / name).unlink()
    assert main(resume) == 0
    assert "learning_rate changed" not in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(out)] == [1, 2]

    # a checkpoint written before fingerprints resumes as before
    (data / "red_0.txt").write_text("something else")
    checkpoint = out / "checkpoints" / "step_00000002"
    state = json.loads((checkpoint / STATE_FILE).read_text())
    del state["data_fingerprint"]
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    assert main(["train", str(cfg), "--set", "train.max_steps=3", "--resume", "latest"]) == 0


def test_data_changes_lists_each_kind_of_change() -> None:
    saved = {"mode": "content", "samples": {"a.png": "1 c", "b.png": "2 c", "c.png": "3 c k", "d.png": "4 c"}}
    current = {"mode": "content", "samples": {"a.png": "1 c", "b.png": "9 x", "c.png": "3 c z", "e.png": "5 c"}}
    assert data_changes(saved, current) == [
        "b.png (content and caption changed)",
        "c.png (control image changed)",
        "d.png (no longer in the data)",
        "e.png (new)",
    ]
    switched = {**current, "mode": "stat"}  # file hashes of another mode are not comparable; captions are
    assert data_changes(saved, switched) == ["b.png (caption changed)", "d.png (no longer in the data)", "e.png (new)"]


def _schedule(lr: float, steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=lr, weight_decay=0.01)
    scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=2, num_training_steps=10)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def test_a_new_learning_rate_continues_the_schedule_exactly(tiny_models, tmp_path, capsys) -> None:
    """Loaded state of a run at 1e-4, then 3e-4: every later rate equals a run started at 3e-4, to the bit."""
    saved_optimizer, saved_scheduler = _schedule(1e-4, 4)
    optimizer, scheduler = _schedule(3e-4, 0)  # built from the new config, as a resume does
    optimizer.load_state_dict(saved_optimizer.state_dict())
    scheduler.load_state_dict(saved_scheduler.state_dict())
    assert scheduler.base_lrs == [1e-4]  # the checkpoint's value: the new one would be ignored

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / STATE_FILE).write_text(
        json.dumps({"config": {"train": {"learning_rate": 1e-4, "weight_decay": 0.01}}})
    )
    cfg = load_config(
        write_config(tmp_path / "c.toml", tiny_models["v1.2"], tmp_path, tmp_path / "o", learning_rate=3e-4)
    )
    cfg.train.weight_decay = 0.05
    run = SimpleNamespace(cfg=cfg, optimizer=optimizer, lr_scheduler=scheduler)
    lines = apply_changed_hyperparameters(run, checkpoint, 4)
    assert lines == [
        "learning_rate changed from 0.0001 to 0.0003: the schedule continues from step 4 with the new value",
        "weight_decay changed from 0.01 to 0.05 from step 4 on",
    ]
    assert capsys.readouterr().out.splitlines() == lines
    reference, reference_scheduler = _schedule(3e-4, 4)
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    for _ in range(4):  # the first resumed step's rate, then each next one
        assert optimizer.param_groups[0]["lr"] == reference.param_groups[0]["lr"]
        assert scheduler.get_last_lr() == reference_scheduler.get_last_lr()
        for opt, sched in ((optimizer, scheduler), (reference, reference_scheduler)):
            opt.step()
            sched.step()


def test_set_base_learning_rate_scales_several_groups() -> None:
    from diffusers.optimization import get_scheduler

    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))]
    optimizer = torch.optim.SGD([{"params": params[:1], "lr": 1e-3}, {"params": params[1:], "lr": 2e-3}], lr=1e-3)
    scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10)
    optimizer.step()
    scheduler.step()
    set_base_learning_rate(optimizer, scheduler, 1e-3, 4e-3)
    assert scheduler.base_lrs == [4e-3, pytest.approx(8e-3)]
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(4e-3 * 0.9), pytest.approx(8e-3 * 0.9)]


def test_resume_with_a_changed_learning_rate_follows_the_new_schedule(tiny_models, tmp_path, capsys) -> None:
    data = make_dataset(tmp_path / "data", sizes=((64, 64),), colours=("red", "blue"))
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "cfg.toml", tiny_models["v1.2"], data, out, max_steps=2, lr_scheduler="cosine", lr_warmup_steps=1
    )
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    args = ["--set", "train.max_steps=4", "--set", "train.learning_rate=0.0003", "--resume", "latest"]
    assert main(["train", str(cfg), *args]) == 0
    printed = capsys.readouterr().out
    assert (
        "learning_rate changed from 0.0001 to 0.0003: the schedule continues from step 2 with the new value" in printed
    )

    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], lr=3e-4)
    reference = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=1, num_training_steps=4)
    expected = []
    for _ in range(4):
        optimizer.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["lr"] for m in metrics[2:]] == expected[2:]
