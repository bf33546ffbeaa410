"""Checkpoints hold safetensors and JSON only, and resuming never unpickles: the state tree round-trips every
value an optimizer, schedule or generator holds; a real run resumes bit-identically with every unpickler
disabled; a pickle planted in a checkpoint (listed in its manifest, so the folder looks intact) never runs;
a checkpoint in accelerate's old pickle format is refused before the model loads."""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_dataset, write_config
from dittune.cli.main import main
from dittune.config.load import load_config
from dittune.train.checkpoint import STATE_FILE, file_manifest
from dittune.train.state_io import load_tree, restore_rng_states, rng_states, save_tree

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_state_tree_round_trips_what_optimizers_and_generators_hold(tmp_path: Path) -> None:
    shared = torch.arange(6.0)
    state = {
        "by_index": {0: {"step": torch.tensor(3.0), "exp_avg": shared[:3]}, 1: {"exp_avg": shared[3:]}},
        "groups": [{"betas": (0.9, 0.999), "lr": 1e-4, "fused": None, "params": [0, 1], "decoupled": True}],
        "odd_floats": [float("nan"), float("inf"), -float("inf"), -0.0],
        "numpy": (np.arange(5, dtype=np.uint32), np.float64(2.5), "MT19937", np.float64("nan"), np.array(7)),
        "__tensor__": "a key that looks like a tag",
        "empty": {},
    }
    save_tree(state, tmp_path, "tree")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree.json", "tree.safetensors"]
    back = load_tree(tmp_path, "tree")
    assert torch.equal(back["by_index"][0]["exp_avg"], shared[:3]) and torch.equal(
        back["by_index"][1]["exp_avg"], shared[3:]
    )
    assert back["groups"] == state["groups"] and isinstance(back["groups"][0]["betas"], tuple)
    nan, *rest = back["odd_floats"]
    assert np.isnan(nan) and rest == [float("inf"), -float("inf"), 0.0] and str(rest[-1]) == "-0.0"
    assert back["numpy"][0].dtype == np.uint32 and back["numpy"][0].tolist() == [0, 1, 2, 3, 4]
    assert back["numpy"][1:3] == (2.5, "MT19937") and np.isnan(back["numpy"][3]) and back["numpy"][4].shape == ()
    assert back["__tensor__"] == state["__tensor__"] and back["empty"] == {}

    with pytest.raises(TypeError, match=r"cannot store function at bad\.groups\[0\]\.fn"):
        save_tree({"groups": [{"fn": lambda: None}]}, tmp_path, "bad")


def test_generator_states_come_back_exactly(tmp_path: Path) -> None:
    save_tree(rng_states(), tmp_path, "rng")
    first = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    restore_rng_states(load_tree(tmp_path, "rng"))
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


class Payload:
    """A pickle that, when loaded, creates a file: what a doctored checkpoint would do with worse code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_resume_reads_no_pickle_and_runs_none_planted(
    tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    data = make_dataset(tmp_path / "data", sizes=((64, 64),), colours=("red", "blue"))
    extra = "[checkpoint]\nevery_steps = 2\nkeep_last = 5\n[lora]\nrank = 4\ndropout = 0.2\n"  # dropout: RNG matters
    straight = tmp_path / "straight"
    cfg = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], data, straight, extra, learning_rate=1e-3)
    assert main(["train", str(cfg)]) == 0
    checkpoint = straight / "checkpoints" / "step_00000002"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == [
        "adapter.safetensors",
        "rng_state_0.json",
        "rng_state_0.safetensors",
        STATE_FILE,
        "training_state.json",
        "training_state.safetensors",
    ]
    assert not any(p.read_bytes().startswith(b"\x80") for p in checkpoint.iterdir())  # no pickle protocol header

    crashed = tmp_path / "crashed" / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint, crashed)
    marker = tmp_path / "code-ran"
    for name in ("optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "scheduler.bin"):
        (crashed / name).write_bytes(pickle.dumps(Payload(marker)))
    state = json.loads((crashed / STATE_FILE).read_text())
    state["files"] = file_manifest(crashed)  # the doctored folder passes the integrity check
    (crashed / STATE_FILE).write_text(json.dumps(state))

    _no_unpickling(monkeypatch)
    args = [
        "train",
        str(cfg),
        "--set",
        f"output_dir={crashed.parent.parent}",
        "--set",
        f"cache.dir={straight / 'cache'}",
    ]
    assert main([*args, "--resume", "latest"]) == 0, capsys.readouterr().err
    assert not marker.exists()
    a, b = (
        load_file(straight / "final" / "lora.safetensors"),
        load_file(crashed.parent.parent / "final" / "lora.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Intact files that lack a part of the state (another version's): a message, not a KeyError traceback.
    document = json.loads((crashed / "training_state.json").read_text())
    del document["tree"]["sampler"]
    (crashed / "training_state.json").write_text(json.dumps(document))
    state["files"] = file_manifest(crashed)
    (crashed / STATE_FILE).write_text(json.dumps(state))
    capsys.readouterr()
    assert main([*args, "--resume", str(crashed)]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume from {crashed}: its training state lacks 'sampler'" in err and "Traceback" not in err


def _config_and_checkpoint_folder(tmp_path: Path, tiny_models: dict[str, Path]) -> tuple[Path, Path]:
    """A run's config and an empty `checkpoints/step_00000002` folder of its output_dir, to fill by hand."""
    data = make_dataset(tmp_path / "data", sizes=((64, 64),), colours=("red",))
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], data, out)
    folder = out / "checkpoints" / "step_00000002"
    folder.mkdir(parents=True)
    return cfg, folder


def test_a_checkpoint_in_accelerates_pickle_format_is_refused_before_loading(
    tmp_path: Path, tiny_models: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    cfg, old = _config_and_checkpoint_folder(tmp_path, tiny_models)
    (old / "optimizer.bin").write_bytes(pickle.dumps({"state": {}, "param_groups": []}))
    (old / "adapter.safetensors").write_bytes(b"")
    (old / STATE_FILE).write_text(json.dumps({"step": 2, "config": {}, "files": file_manifest(old)}))
    assert main(["train", str(cfg), "--resume", "latest"]) != 0
    captured = capsys.readouterr()
    assert "accelerate's pickled state" in captured.err and "never unpickles" in captured.err, captured.err
    assert str(old) in captured.err and "Traceback" not in captured.err
    assert "Encoding latents" not in captured.err and "Training" not in captured.out  # refused before any work


def test_a_deepspeed_checkpoint_is_unpickled_only_when_trusted(
    tmp_path: Path, tiny_models: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    cfg, engine = _config_and_checkpoint_folder(tmp_path, tiny_models)
    (engine / "pytorch_model" / "mp_rank_00_model_states.pt").parent.mkdir()
    (engine / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps({"module": {}}))
    state = {"step": 2, "engine": "deepspeed", "processes": 1, "config": {}, "files": file_manifest(engine)}
    (engine / STATE_FILE).write_text(json.dumps(state))

    assert main(["train", str(cfg), "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert f"{engine} was written under DeepSpeed" in err and "checkpoint.trust_deepspeed_pickles = true" in err
    trusted = ["--set", "checkpoint.trust_deepspeed_pickles=true"]
    assert main(["train", str(cfg), *trusted, "--resume", "latest"]) == 2  # past the trust check, then:
    err = capsys.readouterr().err
    assert "trust_deepspeed_pickles" not in err and "holds no run config" in err, err
    state["config"] = json.loads(load_config(cfg).model_dump_json())
    (engine / STATE_FILE).write_text(json.dumps(state))
    assert main(["train", str(cfg), *trusted, "--resume", "latest"]) == 2
    assert "was written by 1 process(es) with deepspeed" in capsys.readouterr().err  # the launch must match
