"""Resumable checkpoints: atomic directories under OUTPUT_DIR/checkpoints, newest K kept.

A checkpoint is written into a temporary folder by `accelerator.save_state` (optimizer, RNG states,
registered objects: LR schedule, data position) plus the trainable weights and a
`trainer_state.json`, which is written last and lists every other file with its size and SHA-256. The folder
is then renamed into place, so a crash mid-save never leaves a checkpoint that looks complete, and a file
damaged later (truncated, missing, changed) is found before anything is loaded: `--resume latest` then says
which checkpoint is damaged and falls back to the newest intact one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d+)$")


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


def file_manifest(folder: Path) -> dict[str, list]:
    """Every file of a checkpoint folder but the state file: relative path → [size, sha256]."""
    folder = Path(folder)
    return {
        str(path.relative_to(folder)): [path.stat().st_size, _digest(path)]
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != STATE_FILE
    }


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint folder (missing, truncated or changed files), or None when it is intact.
    Checkpoints from before file manifests are taken as they are."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as error:
        return f"{STATE_FILE} unreadable ({error})"
    for name, (size, digest) in (state.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written (truncated?)"
        if _digest(file) != digest:
            return f"{name} changed since it was written (checksum differs)"
    return None


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_dir(output_dir)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _NAME.match(child.name)
            if match and (child / STATE_FILE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume(output_dir: Path, resume: str | None, announce=print) -> Path | None:
    """The checkpoint to resume from: None for a fresh start, the newest intact one for "latest" (each damaged
    newer one is named and passed over), or a path (refused when damaged)."""
    if resume is None:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        for _, path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            announce(f"warning: checkpoint {path} is damaged ({problem}); trying the one before it")
        if found:
            raise FileNotFoundError(
                f"--resume latest: every checkpoint in {checkpoints_dir(output_dir)} is damaged; "
                "start again without --resume (with --overwrite), or restore one"
            )
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint there (missing {STATE_FILE})")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise FileNotFoundError(f"--resume {resume}: the checkpoint is damaged ({problem}); pick another one")
    return path


def save_checkpoint(
    accelerator: Any,
    output_dir: Path,
    step: int,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically and prune old ones; returns its folder (renamed into place only
    after every process has written its part)."""
    root = checkpoints_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {**state, "files": file_manifest(tmp)}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: Path) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; returns the trainer state.

    The number of processes may differ from the one that saved it, as long as the global batch is the same
    (`check_resume_compatible` refuses otherwise): the data order follows the global batch and every random
    draw is keyed by sample, not by process.
    """
    state = json.loads((Path(path) / STATE_FILE).read_text())
    accelerator.load_state(str(path))
    return state
