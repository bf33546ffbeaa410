"""Turn the config's data folder into a bucket plan and filled caches, before the denoiser loads."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from dittune.cache.build import (
    DTYPES,
    ONE_PROCESS,
    CacheStats,
    LatentJob,
    Shard,
    ensure_latents,
    ensure_text_embeddings,
    release_memory,
)
from dittune.cache.store import CacheStore
from dittune.config.schema import DittuneConfig
from dittune.data.buckets import snap, square_bucket
from dittune.data.discover import discover
from dittune.data.report import ClipOptions, DatasetPlan, format_bucket_report, plan_dataset, remove_samples
from dittune.data.transforms import RESIZE_METHOD, ImageLoadError
from dittune.data.types import Placement
from dittune.data.video import DECODE_METHOD, load_sample
from dittune.fingerprint import Fingerprinter
from dittune.models.base import ModelSpec

log = logging.getLogger(__name__)

EMPTY_PROMPT = ""


@dataclass
class PreparedData:
    plan: DatasetPlan
    latent_keys: dict[tuple[str, bool], str]
    """(sample key, flipped) → latent cache key."""
    text_keys: dict[str, str]
    """prompt → text cache key (captions, the empty prompt, validation prompts and negative prompt)."""
    report: str
    stats: dict[str, CacheStats] = field(default_factory=dict)


def validation_size(cfg: DittuneConfig, alignment: int, fixed_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height) for validation: configured (snapped to the alignment), else the model's only size when it
    has one, else the square bucket of data.resolution ("pixel" or "area")."""
    side_w, side_h = fixed_size or square_bucket(cfg.data.resolution, cfg.data.resolution_type, alignment)
    width, height = cfg.validation.width, cfg.validation.height
    return (snap(width, alignment) if width else side_w), (snap(height, alignment) if height else side_h)


def clip_options(cfg: DittuneConfig, spec: ModelSpec) -> ClipOptions:
    """The data section's frame settings under the model's frame rule."""
    rule = spec.frame_rule_at(spec.path)
    frames = (cfg.data.frames or spec.default_frames) if rule.is_video else 1
    return ClipOptions(rule, frames, cfg.data.fps, cfg.data.frame_sampling, cfg.data.short_clips)


def validation_frames(cfg: DittuneConfig, spec: ModelSpec) -> int:
    """Frames per validation clip: validation.frames, else data.frames, snapped down to the rule (1 for images)."""
    rule = spec.frame_rule_at(spec.path)
    return rule.snap_down(cfg.validation.frames or cfg.data.frames or spec.default_frames)


def validation_fps(cfg: DittuneConfig, spec: ModelSpec, plan: DatasetPlan | None = None) -> float:
    """Rate of validation clips: validation.fps, else data.fps, else the median rate of the planned clips
    (what training saw), else the family's default."""
    if cfg.validation.fps or cfg.data.fps:
        return float(cfg.validation.fps or cfg.data.fps)
    rates = sorted(s.placement.fps for s in plan.samples if s.placement.fps) if plan is not None else []
    return float(rates[len(rates) // 2]) if rates else spec.default_fps


def latent_geometry(placement: Placement, flip: bool) -> dict:
    """What decides a sample's pixels, for its cache key (a still's has no frame entries, as before clips)."""
    geometry = {
        "bucket": list(placement.bucket),
        "resized": list(placement.resized),
        "crop_left_top": list(placement.crop_left_top),
        "flip": flip,
        "resize": RESIZE_METHOD,
    }
    if placement.frame_indices:
        geometry.update(frames=list(placement.frame_indices), fps=placement.fps, decode=DECODE_METHOD)
    return geometry


def plan_data(cfg: DittuneConfig, spec: ModelSpec, processes: int = 1) -> DatasetPlan:
    """Discover and plan the dataset; batches are global (`train.batch_size` × `processes`)."""
    data = cfg.data
    clips = clip_options(cfg, spec)
    records, skipped = discover(data.path, data.caption_extension, data.missing_caption, video=clips.rule.is_video)
    return plan_dataset(
        records,
        data.path,
        resolution=data.resolution,
        resolution_type=data.resolution_type,
        alignment=spec.alignment,
        step=data.bucket_step,
        max_aspect_ratio=data.max_aspect_ratio,
        crop=data.crop,
        crop_seed=data.crop_seed,
        batch_size=cfg.train.batch_size * processes,
        incomplete_batches=data.incomplete_batches,
        skipped=skipped,
        repeats=data.repeats,
        clips=clips,
        fixed_size=spec.fixed_size,
    )


def bucket_report(cfg: DittuneConfig, plan: DatasetPlan, processes: int = 1) -> str:
    train = cfg.train
    global_batch = train.batch_size * processes
    return format_bucket_report(plan, global_batch, train.gradient_accumulation_steps, cfg.data.repeats, processes)


def prepare_data(
    cfg: DittuneConfig,
    spec: ModelSpec,
    *,
    device: torch.device,
    compute_dtype: str,
    get_vae: Callable[[], torch.nn.Module],
    progress: bool = True,
    announce: Callable[[str], None] = print,
    shard: Shard = ONE_PROCESS,
) -> PreparedData:
    """Plan buckets (report printed before any encoding), then fill both caches (split across processes by
    `shard`)."""
    plan = plan_data(cfg, spec, shard.world)
    announce(bucket_report(cfg, plan, shard.world))
    store = CacheStore(cfg.cache_dir)
    fingerprinter = Fingerprinter(cfg.cache_dir / "fingerprints.json")
    flips = (False, True) if cfg.data.random_flip else (False,)
    job_ids: list[tuple[str, bool]] = []
    jobs: list[LatentJob] = []
    for sample in plan.samples:
        for flip in flips:
            placement = sample.placement
            job_ids.append((sample.key, flip))
            jobs.append(
                LatentJob(
                    sample.record.path,
                    latent_geometry(placement, flip),
                    placement.shape,
                    partial(load_sample, sample.record.path, placement, flip),
                )
            )
    keys, latent_stats = ensure_latents(
        spec,
        store,
        jobs,
        get_vae=get_vae,
        fingerprinter=fingerprinter,
        source_mode=cfg.cache.source_fingerprint,
        compute_dtype=compute_dtype,
        storage_dtype=cfg.cache.latent_dtype,
        batch_size=cfg.cache.vae_batch_size,
        load_errors=(ImageLoadError,),
        progress=progress,
        vae_options={"tiling": True} if cfg.cache.vae_tiling else None,
        shard=shard,
    )
    failed_keys = {job_id[0] for job_id, key in zip(job_ids, keys) if key is None}
    if failed_keys:
        reason_by_path = dict(latent_stats.failed)
        reasons = {s.key: reason_by_path[s.record.path] for s in plan.samples if s.record.path in reason_by_path}
        plan = remove_samples(plan, failed_keys, reasons)
        announce(f"{len(failed_keys)} file(s) failed to decode and were left out:")
        for path, reason in latent_stats.failed:
            announce(f"  {path}: {reason}")
    latent_keys = {job_id: key for job_id, key in zip(job_ids, keys) if key is not None}
    captions = [s.record.caption for s in plan.samples]
    prompts = [*captions, EMPTY_PROMPT, *cfg.validation.prompts, cfg.validation.negative_prompt]
    text_keys, text_stats = ensure_text_embeddings(
        spec,
        store,
        prompts,
        fingerprinter=fingerprinter,
        device=device,
        compute_dtype=compute_dtype,
        storage_dtype=cfg.cache.text_dtype,
        batch_size=cfg.cache.text_batch_size,
        progress=progress,
        shard=shard,
    )
    fingerprinter.save()
    # No collection here: text encoders are released by ensure_text_embeddings, the VAE by its owner (fill_caches).
    return PreparedData(
        plan=plan,
        latent_keys=latent_keys,
        text_keys=text_keys,
        report=bucket_report(cfg, plan, shard.world),
        stats={"latents": latent_stats, "text": text_stats},
    )


def fill_caches(
    cfg: DittuneConfig,
    spec: ModelSpec,
    *,
    device: torch.device,
    compute_dtype: str,
    keep_vae: bool,
    progress: bool = True,
    announce: Callable[[str], None] = print,
    shard: Shard = ONE_PROCESS,
) -> tuple[PreparedData, torch.nn.Module | None]:
    """`prepare_data` with the VAE loaded only if needed; returns it (moved to CPU) when `keep_vae`."""
    holder: dict[str, torch.nn.Module] = {}

    def get_vae() -> torch.nn.Module:
        if "vae" not in holder:
            holder["vae"] = spec.load_vae(device, DTYPES[compute_dtype])
            spec.configure_vae(holder["vae"], tiling=cfg.cache.vae_tiling)
        return holder["vae"]

    prepared = prepare_data(
        cfg,
        spec,
        device=device,
        compute_dtype=compute_dtype,
        get_vae=get_vae,
        progress=progress,
        announce=announce,
        shard=shard,
    )
    encoded = "vae" in holder  # loaded for missing latents
    vae = get_vae().to("cpu") if keep_vae else None
    holder.clear()
    if encoded or (vae is not None and device.type != "cpu"):  # memory to give back (a collection costs 0.1–0.3 s)
        release_memory()
    return prepared, vae
