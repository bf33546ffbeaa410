"""Entry points behind `dittune train` and `dittune cache`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

from dittune.config.errors import ConfigError, Problem
from dittune.config.schema import DittuneConfig
from dittune.errors import RunStopped
from dittune.train.checkpoint import STATE_FILE, load_checkpoint, resolve_resume
from dittune.train.lock import RunLock, previous_run, remove_run_outputs
from dittune.train.preflight import device_checks, preflight
from dittune.train.resume_changes import apply_changed_hyperparameters, check_resume_data

RESUME_CRITICAL = (
    ("model", "family"),
    ("model", "path"),
    ("data",),
    ("train", "method"),
    ("train", "init"),
    ("train", "seed"),
    ("lora",),
    ("cache", "latent_sampling"),
)


def check(cfg: DittuneConfig, device_type: str | None = None) -> None:
    """Raise `ConfigError` listing every preflight problem (and the device's, when `device_type` is given)."""
    problems = preflight(cfg) + (device_checks(cfg, device_type) if device_type else [])
    if problems:
        raise ConfigError([Problem(path, message) for path, message in problems])


def _dig(data: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        data = data.get(key, {}) if isinstance(data, dict) else {}
    return data


def check_resume_compatible(cfg: DittuneConfig, checkpoint: Path, processes: int = 1, engine: str = "ddp") -> None:
    """Refuse to resume when a setting that changes the data stream or the model differs.

    The split of the global batch may change (processes, `train.batch_size`, accumulation), its size may not;
    a sharded engine's checkpoint (FSDP, DeepSpeed) needs the same engine and number of processes.
    """
    state = json.loads((checkpoint / STATE_FILE).read_text())
    saved, current = state.get("config"), json.loads(cfg.model_dump_json())
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict):
        raise ValueError(
            f"cannot resume: {checkpoint / STATE_FILE} holds no run config (not written by dittune train?); "
            "resume from another checkpoint, or start a new run"
        )
    changed = [".".join(keys) for keys in RESUME_CRITICAL if _dig(saved, keys) != _dig(current, keys)]
    problems = [
        Problem(
            key,
            f"differs from the checkpoint {checkpoint}; resuming would not continue that run. "
            "Restore it, or start a new run in another output_dir.",
        )
        for key in changed
    ]
    before = global_batch(saved["train"], int(state.get("processes", 1)))
    now = global_batch(current["train"], processes)
    if before[0] != now[0]:
        problems.append(
            Problem(
                "train.batch_size",
                f"the checkpoint {checkpoint} took {before[0]} samples per step ({before[1]}); this run takes "
                f"{now[0]} ({now[1]}). Keep batch_size × processes × gradient_accumulation_steps at {before[0]} "
                "(any split of it resumes the same run).",
            )
        )
    saved_engine, saved_processes = state.get("engine", "ddp"), int(state.get("processes", 1))
    if saved_engine != engine or (engine != "ddp" and saved_processes != processes):
        problems.append(
            Problem(
                "checkpoint",
                f"{checkpoint} was written by {saved_processes} process(es) with {saved_engine}; this run has "
                f"{processes} with {engine}. A sharded checkpoint resumes only with the same launch (accelerate "
                "config and number of processes).",
            )
        )
    if problems:
        raise ConfigError(problems)


def global_batch(train: dict[str, Any], processes: int) -> tuple[int, str]:
    """(samples per optimizer step, how they are made up) of a `[train]` section run on `processes`."""
    batch, accumulation = int(train.get("batch_size", 1)), int(train.get("gradient_accumulation_steps", 1))
    return batch * processes * accumulation, f"batch {batch} × {processes} process(es) × accumulation {accumulation}"


def run_train(cfg: DittuneConfig, resume: str | None = None, progress: bool = True, overwrite: bool = False) -> Any:
    """Train as configured; returns the `TrainResult` (final output folder, steps, validation errors).

    The output_dir is locked for the run (a second run on it is refused); without `resume`, a folder holding
    another run's checkpoints, final weights or metrics is refused, unless `overwrite` removes them first.
    """
    from dittune.train.setup import launch_engine, run_precision, training_device
    from dittune.train.sharding import engine_problems

    device = training_device()
    check(cfg, device.type)
    engine_conflicts = engine_problems(cfg, launch_engine())
    if engine_conflicts:
        raise ConfigError([Problem(key, message) for key, message in engine_conflicts])
    if resume is not None and overwrite:
        raise ValueError("--overwrite starts a new run and --resume continues one: pass only one of them")
    precision = run_precision(cfg, device)
    with claimed_output_dir(cfg.output_dir, lambda: _new_run_checks(cfg, resume, overwrite)):
        return _train(cfg, resume, progress, precision)


def _train(cfg: DittuneConfig, resume: str | None, progress: bool, precision: Any) -> Any:
    from dittune.train.setup import build_run, distributed_state, launch_engine, make_accelerator
    from dittune.train.summary import startup_summary
    from dittune.train.trainer import Trainer

    resume_path = resolve_resume(cfg.output_dir, resume, trust_pickles=cfg.checkpoint.trust_deepspeed_pickles)
    if resume == "latest" and resume_path is None:
        print(f"--resume latest: no checkpoint in {cfg.output_dir}, starting from step 0")
    if resume_path is not None:
        check_resume_compatible(cfg, resume_path, distributed_state().num_processes, launch_engine())
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    (cfg.output_dir / "config.resolved.json").write_text(cfg.model_dump_json(indent=2))
    accelerator = make_accelerator(cfg, precision)
    if precision.warning:
        accelerator.print(f"warning: {precision.warning}")
    check_data = partial(check_resume_data, cfg, resume_path) if resume_path is not None else None
    run = build_run(
        cfg, accelerator, precision=precision, progress=progress, announce=accelerator.print, check_data=check_data
    )
    start_step = 0
    if resume_path is not None:
        start_step = int(load_checkpoint(run.checkpointed(), resume_path)["step"])
        apply_changed_hyperparameters(run, resume_path, start_step, accelerator.print)
    if accelerator.is_main_process:
        tracker_config = {
            k: v
            for k, v in _flatten(json.loads(cfg.model_dump_json())).items()
            if isinstance(v, int | float | str | bool)
        }
        accelerator.init_trackers("dittune", config=tracker_config)
    accelerator.print(startup_summary(run, str(resume_path) if resume_path else None, start_step))
    result = Trainer(run, start_step=start_step, progress=progress).train()
    accelerator.print(f"Done: {result.steps} steps. Final weights in {result.final}")
    if result.validation_errors:
        accelerator.print(f"{len(result.validation_errors)} validation image(s) failed (training was not affected):")
        for error in result.validation_errors:
            accelerator.print(f"  {error}")
    return result


@contextmanager
def claimed_output_dir(output_dir: Path, checks: Callable[[], None] | None = None) -> Iterator[RunLock | None]:
    """Hold `output_dir`'s lock for the block, on the main process of a multi-process run only (global rank 0);
    `checks` then runs there too, with the lock held. A refusal on the main process stops every process: its
    outcome is broadcast before anyone goes on, so no process waits at a barrier the others never reach."""
    from dittune.train.setup import distributed_state

    state = distributed_state()
    lock, refusal = None, None
    if state.is_main_process:
        try:
            lock = RunLock(output_dir).acquire()
            for note in lock.notes:
                print(note)
            if checks is not None:
                checks()
        except Exception as error:  # shared with the other processes below, then raised here
            refusal = error
            if lock is not None:
                lock.release()
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        outcome = broadcast_object_list([None if refusal is None else str(refusal)])[0]
        if outcome is not None and refusal is None:
            raise RunStopped(f"process {state.process_index}: the main process refused to start (see its message)", 2)
    if refusal is not None:
        raise refusal
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _new_run_checks(cfg: DittuneConfig, resume: str | None, overwrite: bool) -> None:
    """Without `--resume`: refuse an output_dir holding another run's outputs, or remove them (`--overwrite`)."""
    if resume is not None:
        return
    if overwrite:
        removed = remove_run_outputs(cfg.output_dir, cfg.cache_dir)
        if removed:
            print(f"--overwrite: removed the previous run's outputs from {cfg.output_dir}:")
            for path in removed:
                print(f"  {path.relative_to(cfg.output_dir)}")
        return
    found = previous_run(cfg.output_dir)
    if found:
        raise FileExistsError(
            f"output_dir {cfg.output_dir} holds another run ({'; '.join(found)}). To continue it pass "
            "`--resume latest`; to start anew choose another output_dir, or pass `--overwrite` to remove that "
            "run's checkpoints, final weights, validation images, metrics and logs (the cache is kept)."
        )


def run_cache(cfg: DittuneConfig, progress: bool = True) -> Any:
    """Build or refresh the caches only; returns the `PreparedData`. When the cache lives in the output_dir
    (the default), that folder is locked meanwhile."""
    from dittune.train.setup import run_precision, training_device

    device = training_device()
    check(cfg, device.type)
    precision = run_precision(cfg, device)
    if precision.warning:
        print(f"warning: {precision.warning}")
    inside = cfg.cache_dir.resolve().is_relative_to(cfg.output_dir.resolve())
    with claimed_output_dir(cfg.output_dir) if inside else nullcontext():
        return _cache(cfg, device, precision, progress)


def _cache(cfg: DittuneConfig, device: Any, precision: Any, progress: bool) -> Any:
    from dittune.train.prepare import fill_caches
    from dittune.train.setup import cache_shard, load_spec, weight_dtype_name

    spec, info = load_spec(cfg)
    for warning in info.warnings:
        print(f"warning: {warning}")
    print(f"Encoding in {weight_dtype_name(cfg, precision)} ({precision.reason})")
    shard = cache_shard()
    say = print if shard.rank == 0 else (lambda _line: None)
    prepared, _ = fill_caches(
        cfg,
        spec,
        device=device,
        compute_dtype=weight_dtype_name(cfg, precision),
        keep_vae=False,
        progress=progress,
        announce=say,
        shard=shard,
    )
    if shard.rank:
        return prepared
    print(prepared.stats["latents"].line("latents"))
    if "control" in prepared.stats:
        print(prepared.stats["control"].line("control images"))
    print(prepared.stats["text"].line("text"))
    print(f"cache: {cfg.cache_dir}")
    return prepared


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
