"""Operating-system errors end a command with one line naming the path and the fix, never a traceback."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from tests.conftest import make_dataset, read_metrics, write_config

from dittune.cli.main import main
from dittune.train.checkpoint import checkpoint_problem, complete_checkpoints


def test_a_file_where_a_run_folder_must_be(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder")
    config = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], make_dataset(tmp_path / "data"), out)
    assert main(["train", str(config), "--set", "train.max_steps=1"]) == 1
    err = capsys.readouterr().err
    assert "checkpoints" in err and "a file stands where a folder is needed" in err and "Traceback" not in err


def test_a_full_disk_is_named(tiny_models: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    """ENOSPC while writing a checkpoint (injected in the writer): the message says the disk is full and what to do."""
    import dittune.train.trainer as trainer

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "checkpoints"))

    monkeypatch.setattr(trainer, "save_checkpoint", full)
    config = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], make_dataset(tmp_path / "data"), tmp_path / "out")
    assert main(["train", str(config), "--set", "train.max_steps=1"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "the disk is full" in err and "checkpoints" in err


def _mount_tmpfs(folder: Path, size: str) -> bool:
    """Mount a fresh tmpfs of `size` on `folder`; False where that is not allowed (not root, a container)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _unmount(folder: Path) -> None:
    """Unmount `folder`; lazily when busy (a failing test's traceback can hold a file of it open)."""
    if subprocess.run(["umount", str(folder)], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def _fill(folder: Path, leave: int) -> Path:
    """A ballast file that leaves `leave` bytes free on `folder`'s file system."""
    stats = os.statvfs(folder)
    ballast = folder / "ballast"
    ballast.write_bytes(bytes(stats.f_bavail * stats.f_frsize - leave))
    return ballast


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_really_full_disk_keeps_the_previous_checkpoint(
    tiny_models: dict[str, Path], tmp_path: Path, capsys, monkeypatch
) -> None:
    """checkpoints/ on a real 8 MB tmpfs, filled after the first checkpoint so the second cannot be written (where
    mounting is not allowed, ENOSPC is injected at the second checkpoint instead): exit status 1, ENOSPC and the
    path named, no traceback, the first checkpoint intact; with space freed, `--resume latest` goes on."""
    out = tmp_path / "out"
    folder = out / "checkpoints"
    mounted = _mount_tmpfs(folder, "8m")
    try:
        data = make_dataset(tmp_path / "data", sizes=((64, 64),), colours=("red", "blue"))
        config = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], data, out, max_steps=1)
        assert main(["train", str(config)]) == 0
        first = folder / "step_00000001"
        written = _files(first)
        if mounted:
            used = sum(len(content) for content in written.values())
            ballast = _fill(folder, used // 2)  # room for half a checkpoint
        else:
            import dittune.train.trainer as trainer

            def full(*args: object, **kwargs: object) -> None:
                (folder / ".tmp-step_00000002").mkdir()
                raise OSError(errno.ENOSPC, "No space left on device", str(folder / ".tmp-step_00000002"))

            monkeypatch.setattr(trainer, "save_checkpoint", full)
        capsys.readouterr()
        resume = ["train", str(config), "--set", "train.max_steps=2", "--resume", "latest"]
        assert main(resume) == 1
        err = capsys.readouterr().err
        assert "No space left on device" in err and str(folder) in err and "resume" in err
        assert "Traceback" not in err
        assert checkpoint_problem(first) is None and _files(first) == written
        assert complete_checkpoints(out) == [(1, first)]  # the interrupted one is never taken

        if mounted:
            ballast.unlink()
        else:
            monkeypatch.undo()
        assert main(resume) == 0
        assert [m["step"] for m in read_metrics(out)][-1] == 2
        assert [step for step, _ in complete_checkpoints(out)] == [1, 2]
    finally:
        if mounted:
            _unmount(folder)


def test_an_unknown_family_is_a_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sample", "--model", str(tmp_path), "--prompt", "p", "--out", "o.png", "--family", "bogus"]) == 2
    assert "unknown model family 'bogus'; known:" in capsys.readouterr().err
