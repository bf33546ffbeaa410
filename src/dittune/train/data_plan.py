"""How a run plans its data, without torch: `dittune config check` prints the same plan training uses.

`plan_data` discovers the data folder and places every sample into its bucket under the model's rules (alignment,
frame rule, fixed size). Those come from `facts`: a `ModelSpec` with `folder` = its model folder, or a torch-free
`FamilyFacts` class with `folder` naming the model folder (its configs are read) or None (the family's defaults).
"""

from __future__ import annotations

from pathlib import Path

from dittune.config.schema import DittuneConfig
from dittune.data.discover import discover
from dittune.data.report import ClipOptions, DatasetPlan, format_bucket_report, plan_dataset
from dittune.models.facts import FamilyFacts


def trains_controlnet(cfg: DittuneConfig) -> bool:
    """Whether samples come with control images (train.method = "controlnet")."""
    return cfg.train.method == "controlnet"


def clip_options(cfg: DittuneConfig, facts: FamilyFacts | type[FamilyFacts], folder: Path | None) -> ClipOptions:
    """The data section's frame settings under the model's frame rule."""
    rule = facts.frame_rule_at(folder) if folder is not None else facts.frame_rule
    default_frames = facts.default_frames_at(folder) if folder is not None else facts.default_frames
    frames = (cfg.data.frames or default_frames) if rule.is_video else 1
    return ClipOptions(rule, frames, cfg.data.fps, cfg.data.frame_sampling, cfg.data.short_clips)


def plan_data(
    cfg: DittuneConfig, facts: FamilyFacts | type[FamilyFacts], folder: Path | None, processes: int = 1
) -> DatasetPlan:
    """Discover and plan the dataset; batches are global (`train.batch_size` × `processes`). DataError (a
    ValueError) when no sample is usable."""
    data = cfg.data
    clips = clip_options(cfg, facts, folder)
    records, skipped = discover(
        data.path,
        data.caption_extension,
        data.missing_caption,
        video=clips.rule.is_video,
        control=trains_controlnet(cfg),
    )
    return plan_dataset(
        records,
        data.path,
        resolution=data.resolution,
        resolution_type=data.resolution_type,
        alignment=facts.alignment_at(folder) if folder is not None else facts.alignment,
        step=data.bucket_step,
        max_aspect_ratio=data.max_aspect_ratio,
        crop=data.crop,
        crop_seed=data.crop_seed,
        batch_size=cfg.train.batch_size * processes,
        incomplete_batches=data.incomplete_batches,
        skipped=skipped,
        repeats=data.repeats,
        clips=clips,
        fixed_size=facts.fixed_size_at(folder) if folder is not None else None,
    )


def bucket_report(cfg: DittuneConfig, plan: DatasetPlan, processes: int = 1) -> str:
    train = cfg.train
    global_batch = train.batch_size * processes
    return format_bucket_report(plan, global_batch, train.gradient_accumulation_steps, cfg.data.repeats, processes)
