"""One run per output_dir (issue 13): the lock file refuses a second run while its owner lives and is taken over
once the owner is gone; a new run refuses a folder holding another run unless `--overwrite`, which removes
exactly that run's outputs and keeps (and reuses) the cache."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_metrics, write_config
from dittune.cli.main import main
from dittune.train.lock import LOCK_FILE, OutputDirLocked, RunLock, owner_record, owner_state

pytestmark = pytest.mark.usefixtures("one_thread")

EXTRA = '[checkpoint]\nevery_steps = 1\nkeep_last = 5\n[validation]\nprompts = ["a red circle"]\nsteps = 1\n'


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])


def _lock_of(process: subprocess.Popen, output_dir: Path, **changes: object) -> dict:
    """A lock record naming `process` as the owner (what that process would have written), written into
    `output_dir`."""
    record = owner_record("dittune train other.toml")
    record["pid"] = process.pid
    stat = Path(f"/proc/{process.pid}/stat").read_text()
    record["pid_start"] = stat[stat.rindex(")") + 2 :].split()[19]
    record.update(changes)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / LOCK_FILE).write_text(json.dumps(record))
    return record


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_lock_is_exclusive_and_released_on_exceptions(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with RunLock(out, command="first") as held:
        record = json.loads((out / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["command"] == "first" and record["started"]
        with pytest.raises(OutputDirLocked, match=rf"pid {os.getpid()} on host {socket.gethostname()}, since") as info:
            RunLock(out).acquire()
        assert "(first)" in str(info.value) and f"kill {os.getpid()}" in str(info.value)
        assert held.held
    assert not (out / LOCK_FILE).exists()
    with pytest.raises(RuntimeError, match="inside"), RunLock(out):
        raise RuntimeError("inside")
    assert not (out / LOCK_FILE).exists()


def test_owner_liveness_compares_host_namespace_and_process_start(tmp_path: Path) -> None:
    process = _sleeper()
    try:
        assert owner_state(_lock_of(process, tmp_path / "a")) == "alive"
        # the same pid on another host (or in another pid namespace) is another process: not checkable from here
        elsewhere = _lock_of(process, tmp_path / "b", host=socket.gethostname() + "-other")
        assert owner_state(elsewhere) == "elsewhere"
        with pytest.raises(OutputDirLocked, match=f"delete {tmp_path / 'b' / LOCK_FILE}"):
            RunLock(tmp_path / "b").acquire()
        assert owner_state(_lock_of(process, tmp_path / "c", pid_namespace="pid:[1]")) == "elsewhere"
        # a live pid that started at another time is a reused pid; another boot id means a reboot since
        assert owner_state(_lock_of(process, tmp_path / "d", pid_start="1")) == "gone"
        assert owner_state(_lock_of(process, tmp_path / "e", boot_id="another-boot")) == "gone"
        process.kill()  # killed but not reaped yet: a zombie, not an owner
        deadline = time.monotonic() + 10
        while " Z " not in Path(f"/proc/{process.pid}/stat").read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert owner_state(_lock_of(process, tmp_path / "f")) == "gone"
    finally:
        process.kill()
        process.wait()
    assert owner_state({"pid": process.pid, "host": socket.gethostname()}) == "gone"


def test_a_live_owner_refuses_a_second_run_and_a_dead_one_is_taken_over(
    tmp_path: Path, tiny_models, dataset, capsys
) -> None:
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], dataset, out, EXTRA, max_steps=2)
    process = _sleeper()
    try:
        record = _lock_of(process, out)
        assert main(["train", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert f"pid {process.pid} on host {record['host']}, since {record['started']}" in err
        assert "dittune train other.toml" in err and f"kill {process.pid}" in err
        assert main(["cache", str(cfg)]) == 2  # the cache lives in the output_dir: locked as well
        assert f"pid {process.pid}" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written, the owner's lock kept
        assert json.loads((out / LOCK_FILE).read_text()) == record
    finally:
        process.kill()
        process.wait()
    assert main(["train", str(cfg)]) == 0  # the owner is gone: a stale lock
    captured = capsys.readouterr().out
    assert f"note: took over the stale lock {out / LOCK_FILE} (pid {process.pid} on host" in captured
    assert "`--resume latest`" in captured
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert not (out / LOCK_FILE).exists()


def test_a_new_run_refuses_a_finished_run_and_overwrite_removes_exactly_its_outputs(
    tmp_path: Path, tiny_models, dataset, capsys
) -> None:
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], dataset, out, EXTRA, max_steps=2)
    assert main(["cache", str(cfg)]) == 0  # a cache alone is not another run
    assert main(["train", str(cfg), "--set", "train.trackers=['tensorboard']"]) == 0
    capsys.readouterr()
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "README").write_text("mine too")
    finished = _tree(out)

    assert main(["train", str(cfg), "--set", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert f"output_dir {out} holds another run (2 checkpoint(s), the newest step_00000002" in err
    assert "final weights" in err and "metrics.jsonl" in err
    assert "`--resume latest`" in err and "`--overwrite`" in err
    assert _tree(out) == finished and not (out / LOCK_FILE).exists()  # untouched, the lock released

    assert main(["train", str(cfg), "--overwrite", "--resume", "latest"]) == 2
    assert "pass only one of them" in capsys.readouterr().err

    cache = {k: v for k, v in finished.items() if k.startswith("cache/")}
    assert cache
    assert main(["train", str(cfg), "--set", "train.max_steps=1", "--overwrite"]) == 0
    captured = capsys.readouterr().out
    listed = captured.split(f"--overwrite: removed the previous run's outputs from {out}:\n")[1].split("\n")
    removed = [line.strip() for line in itertools.takewhile(lambda line: line.startswith("  "), listed)]
    assert removed == [
        "checkpoints/step_00000001",
        "checkpoints/step_00000002",
        "validation/step_00000000",
        "validation/step_00000002",
        "final",
        "logs",
        "metrics.jsonl",
        "loss.png",
    ]
    assert "latents: 8 cached, 0 encoded" in captured  # the cache was kept and reused
    after = _tree(out)
    assert {k: v for k, v in after.items() if k.startswith("cache/")} == cache
    assert after["notes.txt"] == b"mine" and after["checkpoints/README"] == b"mine too"
    assert [m["step"] for m in read_metrics(out)] == [1]  # only the new run's
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["README", "step_00000001"]
    assert not (out / "logs").exists() and not (out / LOCK_FILE).exists()


def test_the_lock_is_released_after_a_failing_run(tmp_path: Path, tiny_models, dataset, monkeypatch) -> None:
    import dittune.train.trainer as trainer

    def failing(self):
        assert (out / LOCK_FILE).exists()  # held while training
        raise RuntimeError("injected failure")

    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], dataset, out, max_steps=1)
    monkeypatch.setattr(trainer.Trainer, "train", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        main(["train", str(cfg)])
    assert not (out / LOCK_FILE).exists()


def test_a_cache_outside_the_output_dir_locks_nothing(tmp_path: Path, tiny_models, dataset) -> None:
    out = tmp_path / "run"
    extra = f'[cache]\ndir = "{tmp_path / "cache"}"\n'
    cfg = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], dataset, out, extra)
    with RunLock(out):  # a run trains there; caching elsewhere does not touch its folder
        assert main(["cache", str(cfg)]) == 0
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    assert (tmp_path / "cache").is_dir() and not any(out.iterdir())


def test_two_processes_stop_together_when_the_main_one_refuses(tmp_path: Path, tiny_models, dataset) -> None:
    """The refusal on process 0 is shared: the other process stops too instead of waiting at a barrier."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], dataset, out, max_steps=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    with RunLock(out, command="the first run"):
        result = subprocess.run(
            [*command, "-m", "dittune", "train", str(cfg)], env=env, capture_output=True, text=True, timeout=120
        )
    assert result.returncode != 0
    assert "is in use by another dittune run" in result.stderr and "(the first run)" in result.stderr
    assert "process 1: the main process refused to start" in result.stderr
