"""Dataset planning (bucket and crop of every image) and the bucket report shown before training."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from dittune.data.buckets import assign_bucket, bucket_sizes, place
from dittune.data.discover import DataError
from dittune.data.types import Bucket, ImageRecord, Placement, Skipped
from dittune.data.video import VideoInfo, available_frames, select_frames
from dittune.models.facts import STILL, FrameRule

INCOMPLETE_BATCH_MODES = ("keep", "drop")
SHORT_CLIP_MODES = ("skip", "shorten")
MAX_SKIPPED_LISTED = 50
MAX_NOTES_LISTED = 20
_FAILED_DECODE_REASON = "failed to decode"
UPSCALE_NOTED = 4.0
"""A sample enlarged more than this factor to cover its bucket gets a note in the report."""
_CONTROL_ASPECT_TOLERANCE = 0.01
"""A control image whose aspect ratio differs from its image's by more than this fraction gets a note."""


@dataclass(frozen=True)
class ClipOptions:
    """How clips become samples: `frames` per sample (snapped down to `rule`), resampled to `fps` (None keeps
    the source rate), chosen by `sampling`; clips too short are skipped or trained at a shorter valid length."""

    rule: FrameRule = STILL
    frames: int = 1
    fps: float | None = None
    sampling: str = "start"
    short_clips: str = "skip"

    @property
    def target(self) -> int:
        return self.rule.snap_down(self.frames)


@dataclass(frozen=True)
class PlannedSample:
    """One image with its bucket placement; `key` is its POSIX path relative to the data root."""

    record: ImageRecord
    placement: Placement
    key: str


@dataclass
class DatasetPlan:
    """Every usable sample with its placement, grouped by bucket.

    `buckets` maps a bucket (width, height) to indices into `samples`, in sample order (only non-empty
    buckets). `dropped_for_batch` counts, per bucket and epoch, the samples left out because
    incomplete_batches = "drop" (with shuffling, which ones rotates from epoch to epoch).
    """

    samples: list[PlannedSample]
    buckets: dict[Bucket, list[int]]
    skipped: list[Skipped]
    dropped_for_batch: dict[Bucket, int]
    batch_size: int = 1
    repeats: int = 1
    incomplete_batches: str = "keep"
    notes: list[str] = field(default_factory=list)
    """Things the user should know that did not skip a sample (snapped frame counts, variable frame rates)."""


def plan_dataset(
    records: Iterable[ImageRecord],
    root: Path,
    *,
    resolution: float,
    resolution_type: str,
    alignment: int,
    step: int,
    max_aspect_ratio: float,
    crop: str,
    crop_seed: int,
    batch_size: int,
    incomplete_batches: str,
    skipped: Iterable[Skipped] = (),
    repeats: int = 1,
    clips: ClipOptions = ClipOptions(),
    fixed_size: tuple[int, int] | None = None,
) -> DatasetPlan:
    """Assign every record a bucket, a crop and (for a clip) its frames, sorted by key; raise `DataError` if no
    batch can be formed."""
    if incomplete_batches not in INCOMPLETE_BATCH_MODES:
        raise ValueError(f"incomplete_batches must be one of {INCOMPLETE_BATCH_MODES}, got {incomplete_batches!r}")
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size and repeats must be at least 1, got {batch_size} and {repeats}")
    if clips.short_clips not in SHORT_CLIP_MODES:
        raise ValueError(f"short_clips must be one of {SHORT_CLIP_MODES}, got {clips.short_clips!r}")
    sizes = bucket_sizes(resolution, resolution_type, alignment, step, max_aspect_ratio)
    skipped = list(skipped)
    notes = _frame_notes(clips)
    if fixed_size is not None:  # the model takes one size only: every sample is resized and cropped to it
        sizes = [fixed_size]
        notes.append(
            f"this model only works at {fixed_size[0]}×{fixed_size[1]}: every sample is resized and cropped to it "
            "(data.resolution and the bucket options do not apply)."
        )
    samples: list[PlannedSample] = []
    for record in records:
        key = sample_key(record.path, root)
        bucket = assign_bucket(record.width, record.height, sizes)
        placement = place(record.width, record.height, bucket, crop, crop_seed, key)
        if record.is_video:
            chosen = _choose_frames(record, clips)
            if isinstance(chosen, str):
                skipped.append(Skipped(record.path, chosen))
                continue
            indices, rate, note = chosen
            placement = replace(placement, frame_indices=indices, fps=rate)
            if note:
                notes.append(f"{key}: {note}")
        if record.control_size is not None:
            notes += _control_aspect_note(record, key)
        notes += _upscale_note(record, placement, key)
        samples.append(PlannedSample(record, placement, key))
    samples.sort(key=lambda sample: sample.key)
    duplicates = sorted(key for key, count in Counter(sample.key for sample in samples).items() if count > 1)
    if duplicates:
        raise DataError(f"the same image is listed more than once: {', '.join(duplicates[:5])}")
    skipped.sort(key=lambda s: (s.path.as_posix(), s.reason))
    plan = _build_plan(samples, skipped, batch_size, repeats, incomplete_batches)
    plan.notes = notes
    return plan


def _frame_notes(clips: ClipOptions) -> list[str]:
    if clips.rule.is_video and clips.target != clips.frames:
        return [f"data.frames = {clips.frames} snapped down to {clips.target} (this family takes {clips.rule} frames)."]
    return []


def _upscale_note(record: ImageRecord, placement: Placement, key: str) -> list[str]:
    """A note when a source is enlarged more than `UPSCALE_NOTED`× to cover its bucket (e.g. a 1×1 image)."""
    scale = placement.resized[0] / record.width
    if scale <= UPSCALE_NOTED:
        return []
    bucket = bucket_label(placement.shape)
    return [f"{key}: {record.width}×{record.height} enlarged {scale:.3g}× to cover its {bucket} bucket (trains blurry)"]


def _control_aspect_note(record: ImageRecord, key: str) -> list[str]:
    """A note when the control image's shape differs from its image's: it is stretched to the image's placement."""
    assert record.control_size is not None
    width, height = record.control_size
    if abs(width * record.height / (height * record.width) - 1) <= _CONTROL_ASPECT_TOLERANCE:
        return []
    return [f"{key}: control image {width}×{height} stretched to the image's aspect ({record.width}×{record.height})"]


def _choose_frames(record: ImageRecord, clips: ClipOptions) -> tuple[tuple[int, ...], float, str] | str:
    """(source frame indices, clip rate, a note or "") for a clip, or the reason it cannot be used."""
    info = VideoInfo(record.width, record.height, record.timestamps, record.fps or 1.0, record.variable_rate)
    rate = clips.fps or info.fps
    have = info.frames if clips.sampling == "uniform" else available_frames(info, clips.fps)
    frames, note = clips.target, ""
    if have < frames:
        at = "" if clips.sampling == "uniform" else f" at {rate:g} fps"
        reason = (
            f"clip has {have} frames{at} ({info.frames} in the file, {info.duration:.2f} s); "
            f"needs {frames} (data.frames)"
        )
        if clips.short_clips == "skip" or not clips.rule.is_video:
            return reason + '; set data.short_clips = "shorten" to train it at a shorter length'
        frames = clips.rule.snap_down(have)
        note = f"{reason}: trained at {frames} frames"
    if record.variable_rate:
        vfr = f"variable frame rate (average {info.fps:.3g} fps): frames chosen by timestamp"
        note = f"{note}; {vfr}" if note else vfr
    indices, chosen_rate = select_frames(info, frames, clips.fps, clips.sampling)
    return indices, chosen_rate, note


def remove_samples(plan: DatasetPlan, keys: set[str], reason_by_key: Mapping[str, str]) -> DatasetPlan:
    """A new plan without the samples in `keys` (e.g. images that failed to decode), listed as skipped.

    The reason comes from `reason_by_key` ("failed to decode" when absent); bucket indices are rebuilt.
    """
    kept = [sample for sample in plan.samples if sample.key not in keys]
    removed = [
        Skipped(sample.record.path, reason_by_key.get(sample.key, _FAILED_DECODE_REASON))
        for sample in plan.samples
        if sample.key in keys
    ]
    skipped = sorted([*plan.skipped, *removed], key=lambda s: (s.path.as_posix(), s.reason))
    pruned = _build_plan(kept, skipped, plan.batch_size, plan.repeats, plan.incomplete_batches)
    pruned.notes = list(plan.notes)
    return pruned


def sample_key(path: Path, root: Path) -> str:
    """The stable ID of an image: its POSIX path relative to the data root."""
    path, root = Path(path), Path(root)
    if path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    resolved_path, resolved_root = path.resolve(), root.resolve()
    if resolved_path.is_relative_to(resolved_root):
        return resolved_path.relative_to(resolved_root).as_posix()
    raise DataError(f"{path} is not inside the data folder {root}")


def _build_plan(
    samples: list[PlannedSample], skipped: list[Skipped], batch_size: int, repeats: int, incomplete_batches: str
) -> DatasetPlan:
    buckets: dict[Bucket, list[int]] = {}
    for index, sample in enumerate(samples):
        buckets.setdefault(sample.placement.shape, []).append(index)
    buckets = dict(sorted(buckets.items()))
    dropped: dict[Bucket, int] = {}
    if incomplete_batches == "drop":
        for bucket, indices in buckets.items():
            remainder = len(indices) * repeats % batch_size
            if remainder:
                dropped[bucket] = remainder
        if all(len(indices) * repeats < batch_size for indices in buckets.values()):
            raise DataError(_no_full_batch_message(buckets, batch_size, repeats, len(samples)))
    elif not samples:
        raise DataError("no usable images left in the dataset (all were skipped).")
    return DatasetPlan(
        samples=samples,
        buckets=buckets,
        skipped=skipped,
        dropped_for_batch=dropped,
        batch_size=batch_size,
        repeats=repeats,
        incomplete_batches=incomplete_batches,
    )


def _no_full_batch_message(buckets: dict[Bucket, list[int]], batch_size: int, repeats: int, total: int) -> str:
    if not total:
        return "no usable images left in the dataset (all were skipped)."
    counts = ", ".join(f"{bucket_label(bucket)}: {len(indices)}" for bucket, indices in buckets.items())
    repeated = f" (× repeats {repeats})" if repeats > 1 else ""
    return (
        f"no bucket has enough images{repeated} for one full batch of batch_size {batch_size} "
        f'(images per bucket: {counts}), and data.incomplete_batches = "drop" discards partial batches. '
        'Set data.incomplete_batches = "keep" or use a smaller train.batch_size.'
    )


def format_bucket_report(
    plan: DatasetPlan, batch_size: int, gradient_accumulation_steps: int = 1, repeats: int = 1, processes: int = 1
) -> str:
    """A readable table of buckets, batches per epoch, partial or dropped batches, and skipped files.

    With several processes, `batch_size` is the global batch (per-process batch × processes)."""
    drop = plan.incomplete_batches == "drop"
    clips = any(sample.record.is_video for sample in plan.samples)
    header = ("bucket w×h×frames" if clips else "bucket", "aspect", "clips" if clips else "images", "batches/epoch")
    header += ("last batch",)
    rows: list[tuple[str, ...]] = []
    total_images = total_batches = total_dropped = 0
    small_buckets = 0
    for bucket, indices in plan.buckets.items():
        width, height = bucket[:2]
        count = len(indices)
        samples = count * repeats
        full, remainder = divmod(samples, batch_size)
        batches = full if drop or not remainder else full + 1
        if not remainder:
            last = "full"
        elif drop:
            last = f"{remainder} dropped"
            total_dropped += remainder
        else:
            last = f"partial ({remainder})"
        if samples < batch_size:
            small_buckets += 1
        rows.append((bucket_label(bucket, clips), _aspect(width, height), str(count), str(batches), last))
        total_images += count
        total_batches += batches
    rows.append(("total", "", str(total_images), str(total_batches), f"{total_dropped} dropped" if drop else ""))

    lines = [
        f"Buckets: {len(plan.buckets)} ("
        + (f"global batch {batch_size} = {batch_size // processes} × {processes} processes" if processes > 1 else "")
        + (f"batch_size {batch_size}" if processes == 1 else "")
        + f", repeats {repeats}, "
        f"gradient_accumulation_steps {gradient_accumulation_steps})"
    ]
    lines += _table(header, rows)
    steps = total_batches // gradient_accumulation_steps
    lines.append(
        f"Per epoch: {total_images * repeats} samples in {total_batches} batches = "
        f"{steps} optimizer step{'s' if steps != 1 else ''}."
    )
    lines.append(_batch_fit_line(small_buckets, batch_size, drop, total_dropped))
    controls = sum(sample.record.control is not None for sample in plan.samples)
    if controls:
        distinct = len({sample.record.control for sample in plan.samples if sample.record.control is not None})
        shared = f" ({distinct} distinct files)" if distinct != controls else ""
        lines.append(f"Control images: {controls}{shared}, each resized, cropped and flipped exactly like its image.")
    lines += _empty_caption_lines(plan.samples)
    lines += _skipped_lines(plan.skipped)
    lines += _note_lines(plan.notes)
    return "\n".join(lines)


def _empty_caption_lines(samples: list[PlannedSample]) -> list[str]:
    """The samples whose caption is empty: they train unconditioned (the empty prompt), which the user should know."""
    empty = [sample.record.path for sample in samples if not sample.record.caption.strip()]
    if not empty:
        return []
    count = len(empty)
    verb = "sample trains" if count == 1 else "samples train"
    lines = [f"Empty captions: {count} {verb} unconditioned (no caption text):"]
    lines += [f"  {path}" for path in empty[:MAX_SKIPPED_LISTED]]
    if len(empty) > MAX_SKIPPED_LISTED:
        lines.append(f"  ... and {len(empty) - MAX_SKIPPED_LISTED} more")
    return lines


def bucket_label(bucket: Bucket, frames: bool | None = None) -> str:
    """ "512×320" for a still bucket, "512×320×49f" for clips (`frames`: force or hide the frame count)."""
    width, height, count = bucket
    show = count > 1 if frames is None else frames
    return f"{width}×{height}×{count}f" if show else f"{width}×{height}"


def _note_lines(notes: list[str]) -> list[str]:
    if not notes:
        return []
    lines = [f"Notes ({len(notes)}):"]
    lines += [f"  {note}" for note in notes[:MAX_NOTES_LISTED]]
    if len(notes) > MAX_NOTES_LISTED:
        lines.append(f"  ... and {len(notes) - MAX_NOTES_LISTED} more")
    return lines


def _aspect(width: int, height: int) -> str:
    if width >= height:
        return f"{width / height:.2f}:1"
    return f"1:{height / width:.2f}"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [row[column].rjust(widths[column]) for column in (2, 3)]
        cells.append(row[4])
        return "  " + "  ".join(cells).rstrip()

    return [line(header), *(line(row) for row in rows)]


def _batch_fit_line(small_buckets: int, batch_size: int, drop: bool, total_dropped: int) -> str:
    if small_buckets:
        noun = "bucket" if small_buckets == 1 else "buckets"
        outcome = "all their images are dropped" if drop else "partial batches"
        line = f"Batch fit: {small_buckets} {noun} smaller than batch_size {batch_size} → {outcome}."
    else:
        line = f"Batch fit: every bucket holds at least one full batch of {batch_size}."
    if drop and total_dropped:
        line += f' {total_dropped} samples per epoch dropped (data.incomplete_batches = "drop").'
    return line


def _skipped_lines(skipped: list[Skipped]) -> list[str]:
    if not skipped:
        return ["Skipped 0 files."]
    lines = [f"Skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''}:"]
    lines += [f"  {entry.path}: {entry.reason}" for entry in skipped[:MAX_SKIPPED_LISTED]]
    if len(skipped) > MAX_SKIPPED_LISTED:
        lines.append(f"  ... and {len(skipped) - MAX_SKIPPED_LISTED} more")
    return lines
