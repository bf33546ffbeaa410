"""Operating-system errors end a command with one line naming the path and the fix, never a traceback."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from tests.conftest import make_dataset, write_config

from dittune.cli.main import main


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


def test_an_unknown_family_is_a_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sample", "--model", str(tmp_path), "--prompt", "p", "--out", "o.png", "--family", "bogus"]) == 2
    assert "unknown model family 'bogus'; known:" in capsys.readouterr().err
