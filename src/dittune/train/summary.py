"""The start-up summary printed before the first step."""

from __future__ import annotations

from dittune.config import DittuneConfig
from dittune.train.optim import optimizer_label, optimizer_warnings
from dittune.train.prepare import validation_fps, validation_frames, validation_size
from dittune.train.setup import Run


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _samples(plan) -> str:
    """ "12 images", or "10 clips + 2 images" when the data has clips."""
    clips = sum(sample.record.is_video for sample in plan.samples)
    images = len(plan.samples) - clips
    if not clips:
        return f"{images} images"
    return f"{clips} clips" + (f" + {images} images" if images else "")


def _validation_lines(run: Run) -> list[str]:
    val = run.cfg.validation
    if not val.prompts:
        return ["Validation off (no validation.prompts)"]
    width, height = validation_size(run.cfg, run.spec.alignment, run.spec.fixed_size)
    asked = (val.width or width, val.height or height)
    snapped = "" if asked == (width, height) else f" (asked {asked[0]}×{asked[1]}; sides snap to {run.spec.alignment})"
    when = f"every {val.every_steps} steps" if val.every_steps else "at the end"
    frames = validation_frames(run.cfg, run.spec)
    clip = f"×{frames} frames at {validation_fps(run.cfg, run.spec, run.prepared.plan):g} fps" if frames > 1 else ""
    conditioned = ", image-to-video" if val.images else ""
    line = f"{len(val.prompts)} prompt(s) at {width}×{height}{clip}{snapped}{conditioned}, {val.steps} steps, {when}"
    return [f"Validation {line}"]


def _precision_line(run: Run) -> str:
    """e.g. "fp32 (auto): this CPU has no native bf16 (AVX2); frozen weights fp32"."""
    precision, asked = run.precision, run.cfg.train.mixed_precision
    asked_text = "auto" if asked == "auto" else f"train.mixed_precision = {asked!r}"
    weights = run.weight_dtype if run.cfg.train.method == "lora" else f"{run.weight_dtype} (trained weights fp32)"
    return f"{precision.name} ({asked_text}): {precision.reason}; frozen weights {weights}"


def _checkpointing(run: Run) -> str:
    """e.g. "checkpointing the first 4 of 8 blocks (ratio 0.5)", "checkpointing all 8 blocks" or "checkpointing off"."""
    if not run.checkpointed_blocks:
        return "checkpointing off"
    total = len(run.spec.transformer_blocks(run.accelerator.unwrap_model(run.denoiser)))
    if run.checkpointed_blocks == total:
        return f"checkpointing all {total} blocks"
    ratio = run.cfg.train.gradient_checkpointing_ratio
    return f"checkpointing the first {run.checkpointed_blocks} of {total} blocks (ratio {ratio:g})"


def _storage_lines(run: Run) -> list[str]:
    """e.g. "Storage    fp8_e4m3: 26 Linear layers, 0.73 MiB → 0.18 MiB (6 kept by skip patterns)" (not default)."""
    from dittune.models.storage import applied_storage

    report = applied_storage(run.accelerator.unwrap_model(run.denoiser))
    return [] if report is None or report.storage == "default" else [f"Storage    {report.line()}"]


def _offload_lines(run: Run) -> list[str]:
    """e.g. "Offload    6 of 8 blocks' frozen weights (1.2 GiB) on cpu, copied to cuda:0 per block, ..." (swapping)."""
    from dittune.models.block_offload import applied_offload

    offload = applied_offload(run.accelerator.unwrap_model(run.denoiser))
    return [] if offload is None else [f"Offload    {offload.line()}"]


def startup_summary(run: Run, resumed_from: str | None, start_step: int) -> str:
    cfg, info, plan = run.cfg, run.info, run.prepared.plan
    total = sum(p.numel() for p in run.accelerator.unwrap_model(run.denoiser).parameters())
    trainable = sum(p.numel() for p in run.trainable)
    stats = run.prepared.stats
    lines = [
        "─" * 60,
        f"Model      {run.spec.display_name} {info.version}  ({_model_source(cfg)})",
        *(f"           {k}: {v}" for k, v in info.summary.items()),
        f"Data       {_samples(plan)} in {len(plan.buckets)} bucket(s), {len(plan.skipped)} skipped  ({cfg.data.path})",
        f"Cache      {stats['latents'].line('latents')}",
        *([f"           {stats['control'].line('control images')}"] if "control" in stats else []),
        f"           {stats['text'].line('text')}   ({cfg.cache_dir})",
        f"Training   {cfg.train.method}"
        + (f" r={cfg.lora.rank} alpha={cfg.lora.alpha or cfg.lora.rank:g}" if cfg.train.method == "lora" else "")
        + f", {_count(trainable)} trainable of {_count(total)} parameters",
        f"           {cfg.train.max_steps} steps × batch {cfg.train.batch_size} × accumulation "
        f"{cfg.train.gradient_accumulation_steps} × {run.accelerator.num_processes} process(es) = "
        f"{cfg.train.batch_size * cfg.train.gradient_accumulation_steps * run.accelerator.num_processes} "
        "samples per step",
        f"           lr {cfg.train.learning_rate:g} ({cfg.train.lr_scheduler}, warmup {cfg.train.lr_warmup_steps}), "
        f"{optimizer_label(cfg.train)}, {_checkpointing(run)}, "
        + (f"compiled {run.compiled_blocks} blocks" if run.compiled_blocks else "eager (train.compile off)"),
        *(f"           warning: {w}" for w in optimizer_warnings(cfg.train, run.accelerator.device.type)),
        f"Precision  {_precision_line(run)}",
        *_storage_lines(run),
        *_offload_lines(run),
        f"Objective  {run.spec.describe_objective(run.loss)}, caption dropout {cfg.train.caption_dropout:g}",
        *_validation_lines(run),
        f"Device     {run.accelerator.device}",
        f"Output     {cfg.output_dir}",
    ]
    if resumed_from:
        lines.append(f"Resumed    from {resumed_from} at step {start_step}")
    lines.append("─" * 60)
    return "\n".join(lines)


def _model_source(cfg: DittuneConfig) -> str:
    """The model folder, or the single-file checkpoint and the folder its other components come from."""
    if cfg.model.checkpoint is None:
        return str(cfg.model.path)
    return f"{cfg.model.path}, components from {cfg.model.folder}"
