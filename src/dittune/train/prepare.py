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
from dittune.data.report import (
    DatasetPlan,
    PlannedSample,
    remove_samples,
)
from dittune.data.transforms import RESIZE_METHOD, ImageLoadError
from dittune.data.types import Placement
from dittune.data.video import DECODE_METHOD, load_sample
from dittune.fingerprint import Fingerprinter
from dittune.models.base import ModelSpec
from dittune.train.data_plan import bucket_report, trains_controlnet
from dittune.train.data_plan import plan_data as plan_for
from dittune.train.resume_changes import data_fingerprint

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
    """"latents" and "text"; "control" too when training a ControlNet."""
    control_keys: dict[tuple[str, bool], str] = field(default_factory=dict)
    """(sample key, flipped) → latent cache key of the sample's control image; empty unless training a ControlNet."""
    data_fingerprint: dict = field(default_factory=dict)
    """The planned samples' content fingerprint (`resume_changes.data_fingerprint`), saved with each checkpoint."""


def validation_size(cfg: DittuneConfig, alignment: int, fixed_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height) for validation: configured (snapped to the alignment), else the model's only size when it
    has one, else the square bucket of data.resolution ("pixel" or "area")."""
    side_w, side_h = fixed_size or square_bucket(cfg.data.resolution, cfg.data.resolution_type, alignment)
    width, height = cfg.validation.width, cfg.validation.height
    return (snap(width, alignment) if width else side_w), (snap(height, alignment) if height else side_h)


def plan_data(cfg: DittuneConfig, spec: ModelSpec, processes: int = 1) -> DatasetPlan:
    """Discover and plan the dataset for the model of `spec` (see `dittune.train.data_plan.plan_data`)."""
    return plan_for(cfg, spec, spec.path, processes)


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
    """What decides a sample's pixels, for its cache key (a still's has no frame entries, as before clips).
    A control image's key takes its target's geometry (see `control_geometry`)."""
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


def control_geometry(placement: Placement, flip: bool) -> dict:
    """The geometry of a sample's control image: exactly its target's, marked as a control."""
    return {**latent_geometry(placement, flip), "role": "control"}


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
    check_data: Callable[[dict], None] | None = None,
) -> PreparedData:
    """Plan buckets (report printed before any encoding), then fill both caches (split across processes by
    `shard`). `check_data` sees the data's content fingerprint first (a resume refuses changed data there)."""
    plan = plan_data(cfg, spec, shard.world)
    announce(bucket_report(cfg, plan, shard.world))
    store = CacheStore(cfg.cache_dir)
    fingerprinter = Fingerprinter(cfg.cache_dir / "fingerprints.json")
    fingerprint = data_fingerprint(plan, fingerprinter, cfg.cache.source_fingerprint)  # as planned, before decoding
    if check_data is not None:
        check_data(fingerprint)
    flips = (False, True) if cfg.data.random_flip else (False,)
    encode = partial(
        ensure_latents,
        spec,
        store,
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
    job_ids = [(sample.key, flip) for sample in plan.samples for flip in flips]
    by_key = {sample.key: sample for sample in plan.samples}
    keys, latent_stats = encode([_target_job(by_key[key], flip) for key, flip in job_ids])
    latent_keys = {job_id: key for job_id, key in zip(job_ids, keys) if key is not None}
    plan = _leave_out_failed(plan, job_ids, keys, latent_stats, announce, "file(s) failed to decode")
    stats = {"latents": latent_stats}
    control_keys: dict[tuple[str, bool], str] = {}
    if trains_controlnet(cfg):
        job_ids = [(sample.key, flip) for sample in plan.samples for flip in flips]
        keys, stats["control"] = encode(
            [_control_job(by_key[key], flip) for key, flip in job_ids], desc="Encoding control images"
        )
        control_keys = {job_id: key for job_id, key in zip(job_ids, keys) if key is not None}
        reason = "sample(s) whose control image failed to decode"
        plan = _leave_out_failed(plan, job_ids, keys, stats["control"], announce, reason, control=True)
        kept = {sample.key for sample in plan.samples}
        latent_keys = {job_id: key for job_id, key in latent_keys.items() if job_id[0] in kept}
        control_keys = {job_id: key for job_id, key in control_keys.items() if job_id[0] in kept}
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
        stats={**stats, "text": text_stats},
        control_keys=control_keys,
        data_fingerprint=fingerprint,
    )


def _target_job(sample: PlannedSample, flip: bool) -> LatentJob:
    placement, path = sample.placement, sample.record.path
    return LatentJob(
        path, latent_geometry(placement, flip), placement.shape, partial(load_sample, path, placement, flip)
    )


def _control_job(sample: PlannedSample, flip: bool) -> LatentJob:
    """The sample's control image, placed with its target's bucket, resize, crop and flip (a still: 1 frame)."""
    placement, path = sample.placement, sample.record.control
    if path is None:
        raise ValueError(f"{sample.key} has no control image (discover it with control=True)")
    geometry = control_geometry(placement, flip)
    return LatentJob(path, geometry, placement.shape, partial(load_sample, path, placement, flip))


def _leave_out_failed(
    plan: DatasetPlan,
    job_ids: list[tuple[str, bool]],
    keys: list[str | None],
    stats: CacheStats,
    announce: Callable[[str], None],
    what: str,
    control: bool = False,
) -> DatasetPlan:
    """The plan without the samples whose job failed, listed as skipped with the reason (and announced)."""
    failed_keys = {job_id[0] for job_id, key in zip(job_ids, keys) if key is None}
    if not failed_keys:
        return plan
    reason_by_path = dict(stats.failed)
    reasons: dict[str, str] = {}
    for sample in plan.samples:
        path = sample.record.control if control else sample.record.path
        if path in reason_by_path:
            reason = reason_by_path[path]
            reasons[sample.key] = f"control image {path.name}: {reason}" if control else reason
    plan = remove_samples(plan, failed_keys, reasons)
    announce(f"{len(failed_keys)} {what} and were left out:")
    for path, reason in stats.failed:
        announce(f"  {path}: {reason}")
    return plan


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
    check_data: Callable[[dict], None] | None = None,
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
        check_data=check_data,
    )
    encoded = "vae" in holder  # loaded for missing latents
    vae = get_vae().to("cpu") if keep_vae else None
    holder.clear()
    if encoded or (vae is not None and device.type != "cpu"):  # memory to give back (a collection costs 0.1–0.3 s)
        release_memory()
    return prepared, vae
