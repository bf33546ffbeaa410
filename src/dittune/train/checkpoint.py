"""Resumable checkpoints: atomic directories under OUTPUT_DIR/checkpoints, newest K kept.

A checkpoint is written into a temporary folder: the trainable weights (the method's `save_weights`),
`training_state.json`/`.safetensors` (optimizer, LR schedule, data position, loss scaler),
`rng_state_<process>.json`/`.safetensors` per process, and `trainer_state.json`, which is written
last and lists every other file with its size and SHA-256. Nothing is pickled, and loading never unpickles
(`dittune.train.state_io`); only DeepSpeed, whose engine owns the optimizer's partitions, writes its own
checkpoint through accelerate. The folder is then renamed into place, so a crash mid-save never leaves a
checkpoint that looks complete, and a file damaged later (truncated, missing, changed) is found before
anything is loaded: `--resume latest` then says which checkpoint is damaged and falls back to the newest
intact one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dittune.errors import os_errors_named
from dittune.train.sharding import is_sharded
from dittune.train.state_io import load_tree, restore_rng_states, rng_states, save_tree

STATE_FILE = "trainer_state.json"
TRAINING_STATE = "training_state"
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


def resolve_resume(output_dir: Path, resume: str | None, announce=print, trust_pickles: bool = False) -> Path | None:
    """The checkpoint to resume from: None for a fresh start, the newest intact one for "latest" (each damaged
    newer one is named and passed over), or a path (refused when damaged)."""
    if resume is None:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        for _, path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return _loadable(path, trust_pickles)
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
    return _loadable(path, trust_pickles)


def _loadable(path: Path, trust_pickles: bool) -> Path:
    """`path`, unless resuming from it would unpickle: an old accelerate-format checkpoint (refused), or a
    DeepSpeed one (only with `checkpoint.trust_deepspeed_pickles`)."""
    problem = legacy_problem(path)
    if problem:
        raise ValueError(f"cannot resume: {problem}")
    if _engine(path) == "deepspeed" and not trust_pickles:
        raise ValueError(
            f"cannot resume: {path} was written under DeepSpeed, whose engine stores its state with torch.save; "
            "loading it unpickles, which can run code. If you made this checkpoint yourself or trust its source, "
            "set checkpoint.trust_deepspeed_pickles = true (or --set checkpoint.trust_deepspeed_pickles=true)"
        )
    return path


def _engine(path: Path) -> str:
    try:
        return str(json.loads((Path(path) / STATE_FILE).read_text()).get("engine", "ddp"))
    except (OSError, ValueError):
        return "ddp"


@dataclass
class Checkpointed:
    """What a checkpoint holds and how: the prepared model and optimizer, objects with `state_dict` that are
    the same on every process (LR schedule, data position), and the method's weight writer and reader."""

    accelerator: Any
    model: Any
    optimizer: Any
    objects: dict[str, Any]
    save_weights: Callable[[Path], None]
    load_weights: Callable[[Path], None]

    @property
    def engine_writes(self) -> bool:
        """DeepSpeed: its engine checkpoints the partitioned optimizer (through `accelerator.save_state`)."""
        return str(getattr(self.accelerator, "distributed_type", "")).endswith("DEEPSPEED")


def _optimizer_state(parts: Checkpointed) -> dict[str, Any]:
    """The whole optimizer state (gathered on the main process when the model is sharded: a collective)."""
    if is_sharded(parts.model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        inner = getattr(parts.optimizer, "optimizer", parts.optimizer)
        return get_optimizer_state_dict(parts.model, inner, options=options)
    return parts.optimizer.state_dict()


def _load_optimizer_state(parts: Checkpointed, state: dict[str, Any]) -> None:
    if is_sharded(parts.model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        inner = getattr(parts.optimizer, "optimizer", parts.optimizer)
        set_optimizer_state_dict(parts.model, inner, state, options=StateDictOptions(full_state_dict=True))
    else:
        parts.optimizer.load_state_dict(state)


def write_training_state(parts: Checkpointed, folder: Path) -> None:
    """Write the weights, the training state and this process's RNG states into `folder` (every process)."""
    accelerator = parts.accelerator
    parts.save_weights(folder)
    optimizer = _optimizer_state(parts)
    if accelerator.is_main_process:
        tree = {"optimizer": optimizer}
        tree.update({name: obj.state_dict() for name, obj in parts.objects.items()})
        if getattr(accelerator, "scaler", None) is not None:
            tree["grad_scaler"] = accelerator.scaler.state_dict()
        save_tree(tree, folder, TRAINING_STATE)
    save_tree(rng_states(), folder, f"rng_state_{accelerator.process_index}")


def read_training_state(parts: Checkpointed, folder: Path) -> None:
    """Restore what `write_training_state` wrote (every process reads the shared files; a process with no RNG
    file of its own — more processes than the run that saved — keeps its seeded generators)."""
    accelerator = parts.accelerator
    parts.load_weights(folder)
    tree = load_tree(folder, TRAINING_STATE)
    _load_optimizer_state(parts, tree["optimizer"])
    for name, obj in parts.objects.items():
        obj.load_state_dict(tree[name])
    if getattr(accelerator, "scaler", None) is not None and "grad_scaler" in tree:
        accelerator.scaler.load_state_dict(tree["grad_scaler"])
    rng = folder / f"rng_state_{accelerator.process_index}.json"
    if rng.is_file():
        restore_rng_states(load_tree(folder, rng.stem))


def legacy_problem(path: Path) -> str | None:
    """Why a checkpoint cannot be loaded without unpickling (written by accelerate's `save_state` before
    dittune wrote its own state files, and not by DeepSpeed), or None."""
    if _engine(path) == "deepspeed" or (Path(path) / f"{TRAINING_STATE}.json").is_file():
        return None
    return (
        f"{path} holds accelerate's pickled state (optimizer.bin, random_states_*.pkl), written by an older "
        "dittune; dittune never unpickles a checkpoint. Finish that run with the version that wrote it, or "
        "start a new one (--overwrite, or another output_dir)"
    )


def save_checkpoint(
    parts: Checkpointed,
    output_dir: Path,
    step: int,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically and prune old ones; returns its folder (renamed into place only
    after every process has written its part)."""
    accelerator = parts.accelerator
    root = checkpoints_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        with os_errors_named(tmp):
            if parts.engine_writes:
                accelerator.save_state(str(tmp))
            else:
                write_training_state(parts, tmp)
    except BaseException:  # a full disk, a signal: the partial folder is never taken for a checkpoint; free it
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def load_checkpoint(parts: Checkpointed, path: Path) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; returns the trainer state.

    The number of processes may differ from the one that saved it, as long as the global batch is the same
    (`check_resume_compatible` refuses otherwise): the data order follows the global batch and every random
    draw is keyed by sample, not by process.
    """
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    if parts.engine_writes:
        parts.accelerator.load_state(str(path))
    else:
        problem = legacy_problem(path)
        if problem:
            raise ValueError(problem)
        try:
            read_training_state(parts, path)
        except (KeyError, TypeError) as error:  # files intact (checked) but not what this dittune writes
            raise ValueError(
                f"cannot resume from {path}: its training state lacks {error} (written by another dittune "
                "version?); resume from another checkpoint, or start a new run"
            ) from error
    # accelerate counts micro-batches to place gradient syncs; a checkpoint is at an optimizer-step boundary, so
    # the count starts again at 0 under any split of the global batch (a restored count of an odd step taken
    # without accumulation, resumed with accumulation 2, would sync on each step's first half: never stepping).
    parts.accelerator.step = 0
    return state
