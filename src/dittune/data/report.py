"""Dataset planning (bucket and crop of every image) and the bucket report shown before training."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dittune.data.buckets import assign_bucket, bucket_sizes, place
from dittune.data.discover import DataError
from dittune.data.types import ImageRecord, Placement, Skipped

INCOMPLETE_BATCH_MODES = ("keep", "drop")
MAX_SKIPPED_LISTED = 50
_FAILED_DECODE_REASON = "failed to decode"

Bucket = tuple[int, int]


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
) -> DatasetPlan:
    """Assign every record a bucket and a crop, sorted by key; raise `DataError` if no batch can be formed."""
    if incomplete_batches not in INCOMPLETE_BATCH_MODES:
        raise ValueError(f"incomplete_batches must be one of {INCOMPLETE_BATCH_MODES}, got {incomplete_batches!r}")
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size and repeats must be at least 1, got {batch_size} and {repeats}")
    sizes = bucket_sizes(resolution, resolution_type, alignment, step, max_aspect_ratio)
    samples: list[PlannedSample] = []
    for record in records:
        key = sample_key(record.path, root)
        bucket = assign_bucket(record.width, record.height, sizes)
        placement = place(record.width, record.height, bucket, crop, crop_seed, key)
        samples.append(PlannedSample(record, placement, key))
    samples.sort(key=lambda sample: sample.key)
    duplicates = sorted(key for key, count in Counter(sample.key for sample in samples).items() if count > 1)
    if duplicates:
        raise DataError(f"the same image is listed more than once: {', '.join(duplicates[:5])}")
    return _build_plan(samples, list(skipped), batch_size, repeats, incomplete_batches)


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
    return _build_plan(kept, skipped, plan.batch_size, plan.repeats, plan.incomplete_batches)


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
        buckets.setdefault(sample.placement.bucket, []).append(index)
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
    counts = ", ".join(f"{w}×{h}: {len(indices)}" for (w, h), indices in buckets.items())
    repeated = f" (× repeats {repeats})" if repeats > 1 else ""
    return (
        f"no bucket has enough images{repeated} for one full batch of batch_size {batch_size} "
        f'(images per bucket: {counts}), and data.incomplete_batches = "drop" discards partial batches. '
        'Set data.incomplete_batches = "keep" or use a smaller train.batch_size.'
    )


def format_bucket_report(
    plan: DatasetPlan, batch_size: int, gradient_accumulation_steps: int = 1, repeats: int = 1
) -> str:
    """A readable table of buckets, batches per epoch, partial or dropped batches, and skipped files."""
    drop = plan.incomplete_batches == "drop"
    header = ("bucket", "aspect", "images", "batches/epoch", "last batch")
    rows: list[tuple[str, ...]] = []
    total_images = total_batches = total_dropped = 0
    small_buckets = 0
    for (width, height), indices in plan.buckets.items():
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
        rows.append((f"{width}×{height}", _aspect(width, height), str(count), str(batches), last))
        total_images += count
        total_batches += batches
    rows.append(("total", "", str(total_images), str(total_batches), f"{total_dropped} dropped" if drop else ""))

    lines = [
        f"Buckets: {len(plan.buckets)} (batch_size {batch_size}, repeats {repeats}, "
        f"gradient_accumulation_steps {gradient_accumulation_steps})"
    ]
    lines += _table(header, rows)
    steps = total_batches // gradient_accumulation_steps
    lines.append(
        f"Per epoch: {total_images * repeats} samples in {total_batches} batches = "
        f"{steps} optimizer step{'s' if steps != 1 else ''}."
    )
    lines.append(_batch_fit_line(small_buckets, batch_size, drop, total_dropped))
    lines += _skipped_lines(plan.skipped)
    return "\n".join(lines)


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
