"""`dittune prepare`: write a dataset whose images and clips are already at their training buckets.

Every sample is planned exactly as training plans it (`report.plan_dataset`: nearest-aspect bucket, resize
to cover it, crop) and its pixels come from the same loaders (`load_pixels`, `pixels_from_image`), so
training on the output at the same resolution and bucket options puts each file in the same bucket with no
further resize or crop, and sees the same pixels (bit-identical for PNG; JPEG and H.264 are near-lossless).

Videos are cut into consecutive clips of `frames` frames (every `stride` frames, at most `max_clips` per
video), optionally resampled to `fps` first; without `frames` a video is kept whole. The output folder holds
the files (relative paths kept), a ``metadata.jsonl`` with ``file_name`` and ``text`` (what `discover`
reads) and a hidden marker that lets ``--overwrite`` replace a previous output, and nothing else.

With `control` (for ControlNet training) every image is paired with its control image as training pairs them
(`discover(..., control=True)`); the control image is placed with exactly its image's resize and crop and written
as ``<output stem>_control.png`` beside it, and named in a ``control`` column of the metadata.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath

import torch
from PIL import Image
from tqdm.auto import tqdm

from dittune.data.buckets import CROP_MODES, RESOLUTION_TYPES, check_step
from dittune.data.discover import (
    CONTROL_COLUMN,
    CONTROL_SUFFIX,
    IMAGE_EXTENSIONS,
    METADATA_JSONL,
    MISSING_CAPTION_MODES,
    DataError,
    discover,
)
from dittune.data.report import PlannedSample, bucket_label, plan_dataset
from dittune.data.transforms import ImageLoadError, load_pixels, pixels_from_image
from dittune.data.types import Bucket, Skipped
from dittune.data.video import (
    VIDEO_EXTENSIONS,
    VideoInfo,
    VideoSupportMissing,
    available_frames,
    load_clip,
    require_av,
    select_frames,
)
from dittune.media import write_frames
from dittune.models.facts import STILL, FrameRule

IMAGE_FORMATS = ("png", "jpeg", "keep")
"""png: every image as PNG (lossless); jpeg: every image as JPEG (quality 95); keep: JPEG sources as JPEG."""
JPEG_QUALITY = 95
MARKER = ".dittune-prepare.json"
"""Written into the output folder; `--overwrite` only ever deletes a folder that has it."""
_JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})
_LISTED = 20


@dataclass(frozen=True)
class PrepareOptions:
    """How to prepare: the bucket settings (as the `data.*` keys of a training config), clip cutting and output."""

    resolution: float
    resolution_type: str = "pixel"
    alignment: int = 16
    bucket_step: int = 64
    max_aspect_ratio: float = 2.0
    crop: str = "center"
    crop_seed: int = 0
    fixed_size: tuple[int, int] | None = None
    """The model's only size, when it has one (every sample goes to it)."""
    frames: int | None = None
    """Frames per clip; None keeps each video whole."""
    stride: int | None = None
    """Frames between the starts of consecutive clips; None: `frames` (consecutive, non-overlapping)."""
    max_clips: int | None = None
    fps: float | None = None
    """Resample videos to this rate before cutting; None keeps each video's own rate."""
    image_format: str = "png"
    caption_extension: str = ".txt"
    missing_caption: str = "skip"
    overwrite: bool = False
    control: bool = False
    """Pair each image with its control image (`<stem>_control.<ext>` or a `control` column) and write it placed
    like its image, as ControlNet training reads them."""
    frame_rule: FrameRule = STILL
    """The target model's clip lengths, when known (only used to warn about a `frames` it would snap down)."""

    def check(self) -> None:
        """Raise ValueError naming the option and the fix for a value that cannot work."""
        if self.resolution <= 0:
            raise ValueError(f"--resolution must be positive, got {self.resolution:g}")
        if self.resolution_type not in RESOLUTION_TYPES:
            raise ValueError(f"--resolution-type must be one of {', '.join(RESOLUTION_TYPES)}")
        if self.alignment < 1:
            raise ValueError(f"--alignment must be a positive number of pixels, got {self.alignment}")
        if self.resolution_type == "pixel" and self.resolution < self.alignment:
            raise ValueError(
                f"--resolution {self.resolution:g} is below the alignment ({self.alignment} px) as a short edge in "
                "pixels; for megapixels add --resolution-type area"
            )
        try:
            check_step(self.bucket_step, self.alignment)
        except ValueError as error:
            raise ValueError(str(error).replace("data.bucket_step", "--bucket-step")) from None
        if self.max_aspect_ratio < 1:
            raise ValueError(f"--max-aspect-ratio must be at least 1, got {self.max_aspect_ratio:g}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"--crop must be one of {', '.join(CROP_MODES)}, got {self.crop!r}")
        for name, value in (("--frames", self.frames), ("--stride", self.stride), ("--max-clips", self.max_clips)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.control and self.frames is not None:
            raise ValueError(
                "--control pairs still images with control images (ControlNet training takes no clips); "
                "remove --frames, or prepare the videos in a separate run without --control"
            )
        if self.stride is not None and self.frames is None:
            raise ValueError("--stride needs --frames (the clip length)")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"--fps must be positive, got {self.fps:g}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"--image-format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        if self.missing_caption not in MISSING_CAPTION_MODES:
            raise ValueError(f"--missing-caption must be one of {', '.join(MISSING_CAPTION_MODES)}")


@dataclass
class PrepareSummary:
    """What a `prepare_dataset` run wrote and left out."""

    source: Path
    out: Path
    images: int = 0
    controls: int = 0
    """Control images written (one per image with --control)."""
    clips: int = 0
    videos: int = 0
    """Source videos that gave at least one clip."""
    buckets: Counter[Bucket] = field(default_factory=Counter)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    upscaled: int = 0
    """Sources smaller than their bucket (enlarged, as training would)."""
    bytes_in: int = 0
    bytes_out: int = 0


def prepare_dataset(source: Path, out: Path, options: PrepareOptions, progress: bool = True) -> PrepareSummary:
    """Write `out`: each usable sample of `source` resized and cropped to its bucket, videos cut into clips,
    and ``metadata.jsonl``. Raises FileNotFoundError / FileExistsError / ValueError for unusable arguments."""
    source, out = Path(source), Path(out)
    options.check()
    if not source.is_dir():
        what = "is not a folder" if source.exists() else "does not exist"
        raise FileNotFoundError(f"{source} {what}; IN must be a dataset folder (images or videos with captions)")
    _check_separate(source, out)
    video = _video_support()
    try:
        records, skipped = discover(
            source, options.caption_extension, options.missing_caption, video=video, control=options.control
        )
        plan = plan_dataset(
            records,
            source,
            resolution=options.resolution,
            resolution_type=options.resolution_type,
            alignment=options.alignment,
            step=options.bucket_step,
            max_aspect_ratio=options.max_aspect_ratio,
            crop=options.crop,
            crop_seed=options.crop_seed,
            batch_size=1,
            incomplete_batches="keep",
            skipped=skipped,
            fixed_size=options.fixed_size,
        )
    except DataError as error:
        raise DataError(str(error).removeprefix("data.path: ")) from None
    summary = PrepareSummary(source, out, skipped=[_explain(s, video) for s in plan.skipped], notes=_notes(options))
    summary.notes += plan.notes + _control_notes(source, options)
    _claim(out, source, options)

    rows: list[dict[str, object]] = []
    used: set[str] = set()
    bar = tqdm(plan.samples, desc="Preparing", unit="file", disable=not progress)
    for sample in bar:
        try:
            if sample.record.is_video and sample.record.frames > 1:
                written = _write_clips(sample, out, options, used, summary)
            else:
                written = [_write_still(sample, out, options, used)]
        except ImageLoadError as error:
            summary.skipped.append(Skipped(sample.record.path, error.reason))
            continue
        resized, record = sample.placement.resized, sample.record
        summary.bytes_in += record.path.stat().st_size + (record.control.stat().st_size if record.control else 0)
        summary.upscaled += resized[0] > record.width or resized[1] > record.height
        for rel, shape, control in written:
            summary.buckets[shape] += 1
            summary.bytes_out += (out / rel).stat().st_size
            row: dict[str, object] = {"file_name": rel, "text": sample.record.caption, "source": sample.key}
            if control is not None:
                summary.controls += 1
                summary.bytes_out += (out / control).stat().st_size
                row[CONTROL_COLUMN] = control
            rows.append(row)
        if sample.record.is_video and sample.record.frames > 1:
            summary.videos += bool(written)
            summary.clips += len(written)
        else:
            summary.images += len(written)
    bar.close()

    metadata = out / METADATA_JSONL
    metadata.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    summary.bytes_out += metadata.stat().st_size
    summary.skipped.sort(key=lambda s: (s.path.as_posix(), s.reason))
    _write_marker(out, source, options, complete=True)
    return summary


def _video_support() -> bool:
    try:
        require_av()
    except VideoSupportMissing:
        return False
    return True


def _explain(skipped: Skipped, video: bool) -> Skipped:
    """Discover's reason for a video file left out because PyAV is missing, said as such."""
    if not video and skipped.path.suffix.lower() in VIDEO_EXTENSIONS:
        return Skipped(skipped.path, "a video file; reading videos needs PyAV: pip install 'dittune[video]'")
    return skipped


def _notes(options: PrepareOptions) -> list[str]:
    rule, frames = options.frame_rule, options.frames
    if rule.is_video and frames is not None and not rule.valid(frames):
        valid = rule.snap_down(frames)
        lengths = " or ".join(str(n) for n in (valid, valid + rule.multiple) if n > 1)
        return [
            f"--frames {frames} is not a clip length the model takes ({rule}): training snaps it down to {valid}; "
            f"use --frames {lengths}"
        ]
    return []


def _control_notes(source: Path, options: PrepareOptions) -> list[str]:
    """Without --control: a note when the source has files named like control images (read as plain images)."""
    if options.control:
        return []
    found = [
        path
        for path in sorted(source.rglob(f"*{CONTROL_SUFFIX}.*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and path.stem.endswith(CONTROL_SUFFIX)
        and not any(part.startswith(".") for part in path.relative_to(source).parts)
    ]
    if not found:
        return []
    example = found[0].relative_to(source).as_posix()
    return [
        f"{len(found)} file(s) named *{CONTROL_SUFFIX}.* (e.g. {example}) look like ControlNet control images; "
        "add --control to pair each with its image (without it they are ordinary images)"
    ]


def _check_separate(source: Path, out: Path) -> None:
    src, dst = source.resolve(), out.resolve()
    if src == dst or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise ValueError(f"OUT ({out}) and IN ({source}) must be separate folders, neither inside the other")


def _claim(out: Path, source: Path, options: PrepareOptions) -> None:
    """Create `out`, or empty it when --overwrite is given and it holds a previous prepare output."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose a new OUT folder")
    if out.is_dir() and any(out.iterdir()):
        if not options.overwrite:
            raise FileExistsError(f"{out} is not empty; choose a new OUT folder, or pass --overwrite to replace it")
        if not (out / MARKER).is_file():
            raise FileExistsError(
                f"{out} is not empty and was not written by `dittune prepare` (no {MARKER}); "
                "--overwrite only replaces a previous prepare output: choose a new OUT folder"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_marker(out, source, options, complete=False)


def _write_marker(out: Path, source: Path, options: PrepareOptions, complete: bool) -> None:
    settings = {k: v for k, v in asdict(options).items() if k not in ("overwrite", "frame_rule")}
    record = {"source": str(source.resolve()), "options": settings, "complete": complete}
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _output_path(key: str, suffix: str, used: set[str], tag: str = "", companion: str = "") -> str:
    """A free relative output path for source `key` (its folder and stem kept; "-2", "-3" … on a clash); with a
    `companion` ending (e.g. "_control.png") the same stem with that ending must be free too, and is taken."""
    rel = PurePosixPath(key)
    stem = rel.stem + tag
    for attempt in range(1, len(used) + 2):
        name = stem if attempt == 1 else f"{stem}-{attempt}"
        names = [(rel.parent / (name + ending)).as_posix().lower() for ending in (suffix, companion) if ending]
        if not used.intersection(names):
            used.update(names)
            return (rel.parent / (name + suffix)).as_posix()
    raise AssertionError("unreachable: one of len(used) + 1 names is free")


def _control_path(rel: str) -> str:
    """The output path of the control image of output image `rel`: `<stem>_control.png` beside it."""
    path = PurePosixPath(rel)
    return path.with_name(f"{path.stem}{CONTROL_SUFFIX}.png").as_posix()


def _to_image(pixels: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [-1, 1] from the loaders back to the 8-bit image it was made from (exact)."""
    array = ((pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, mode="RGB")


def _write_still(
    sample: PlannedSample, out: Path, options: PrepareOptions, used: set[str]
) -> tuple[str, Bucket, str | None]:
    """Write one image (and its control image, placed the same way); returns (path, bucket, control path)."""
    record, placement = sample.record, sample.placement
    if record.is_video:  # a one-frame video: its frame is a still
        pixels = load_clip(record.path, replace(placement, frame_indices=(0,)), False)[:, 0]
    else:
        pixels = load_pixels(record.path, placement, False)
    control = None
    if record.control is not None:  # loaded before anything is written: a sample is written whole or not at all
        try:
            control = load_pixels(record.control, placement, False)
        except ImageLoadError as error:
            raise ImageLoadError(f"control image {record.control.name}: {error.reason}", record.control) from None
    jpeg = options.image_format == "jpeg" or (
        options.image_format == "keep" and record.path.suffix.lower() in _JPEG_SUFFIXES
    )
    companion = f"{CONTROL_SUFFIX}.png" if control is not None else ""
    rel = _output_path(sample.key, ".jpg" if jpeg else ".png", used, companion=companion)
    target = out / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    image = _to_image(pixels)
    if jpeg:
        image.save(target, quality=JPEG_QUALITY)
    else:
        image.save(target)
    if control is None:
        return rel, placement.shape, None
    control_rel = _control_path(rel)
    _to_image(control).save(out / control_rel)  # PNG whatever --image-format: the exact placed pixels
    return rel, placement.shape, control_rel


def _write_clips(
    sample: PlannedSample, out: Path, options: PrepareOptions, used: set[str], summary: PrepareSummary
) -> list[tuple[str, Bucket, None]]:
    """Cut one video into clips at its bucket; returns (relative path, bucket, None) per clip written."""
    record, placement = sample.record, sample.placement
    width, height = placement.bucket
    if width % 2 or height % 2:
        reason = f"bucket {width}×{height} has an odd side, which H.264 cannot store; use an even --alignment"
        raise ImageLoadError(reason)
    info = VideoInfo(record.width, record.height, record.timestamps, record.fps or 1.0, record.variable_rate)
    have = available_frames(info, options.fps)
    length = options.frames or have
    stride = options.stride or length
    count = (have - length) // stride + 1 if have >= length else 0
    if options.max_clips is not None:
        count = min(count, options.max_clips)
    if count == 0:
        rate = options.fps or info.fps
        raise ImageLoadError(
            f"video has {have} frames at {rate:g} fps ({info.frames} in the file, {info.duration:.2f} s); "
            f"needs {length} (--frames)"
        )
    targets, rate = select_frames(info, have, options.fps, "start")
    targets = targets[: (count - 1) * stride + length]
    left = have - len(targets)
    if left and options.max_clips is None:
        summary.notes.append(f"{sample.key}: last {left} of {have} frames not used (shorter than a clip)")
    slots: dict[int, list[int]] = {}
    for position, source_index in enumerate(targets):
        slots.setdefault(source_index, []).append(position)

    open_clips: dict[int, list[Image.Image]] = {}
    written: list[tuple[str, Bucket, None]] = []
    digits = max(3, len(str(count - 1)))
    try:
        for index, frame in _decoded(record.path, max(targets)):
            if index not in slots:
                continue
            image = _to_image(pixels_from_image(frame, placement, False, record.path))
            for position in slots[index]:
                first = max(0, -(-(position - length + 1) // stride))
                for clip in range(first, min(count - 1, position // stride) + 1):
                    frames = open_clips.setdefault(clip, [])
                    frames.append(image)
                    if len(frames) == length:
                        tag = f"_{clip:0{digits}d}" if options.frames is not None else ""
                        rel = _output_path(sample.key, ".mp4", used, tag)
                        write_frames(open_clips.pop(clip), out / rel, rate)
                        written.append((rel, (width, height, length), None))
        problem = "video ended early"
    except ImageLoadError as error:
        if not written:
            raise
        problem = error.reason
    if len(written) < count:
        summary.skipped.append(Skipped(record.path, f"{problem}: {len(written)} of {count} clips written"))
    return written


def _decoded(path: Path, last: int) -> Iterator[tuple[int, Image.Image]]:
    """(position, RGB frame) in presentation order up to position `last`, one at a time (a long video is
    never held in memory); raises ImageLoadError when the stream breaks."""
    av = require_av()
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for position, frame in enumerate(container.decode(stream)):
                yield position, frame.to_image().convert("RGB")
                if position >= last:
                    break
    except (av.FFmpegError, OSError, ValueError) as error:
        raise ImageLoadError(f"video is truncated or corrupt ({error})", path) from error


def format_summary(summary: PrepareSummary, options: PrepareOptions) -> str:
    """The report printed after `dittune prepare`: counts, buckets, sizes, skipped files, notes, config hint."""
    clips = f", {summary.clips} clip(s) from {summary.videos} video(s)" if summary.clips else ""
    controls = f", each with its control image ({summary.controls})," if summary.controls else ""
    lines = [f"Prepared {summary.images} image(s){controls}{clips} in {summary.out}"]
    if summary.buckets:
        shown = ", ".join(f"{bucket_label(b)}: {n}" for b, n in sorted(summary.buckets.items()))
        lines.append(f"  buckets: {shown}")
    ratio = f" ({summary.bytes_out / summary.bytes_in:.0%})" if summary.bytes_in else ""
    lines.append(f"  size: {_size(summary.bytes_in)} in → {_size(summary.bytes_out)} out{ratio}")
    if summary.upscaled:
        lines.append(f"  upscaled: {summary.upscaled} source(s) smaller than their bucket")
    if summary.skipped:
        lines.append(f"Skipped {len(summary.skipped)} input(s):")
        lines += [f"  {s.path}: {s.reason}" for s in summary.skipped[:_LISTED]]
        if len(summary.skipped) > _LISTED:
            lines.append(f"  ... and {len(summary.skipped) - _LISTED} more")
    if summary.notes:
        lines.append(f"Notes ({len(summary.notes)}):")
        lines += [f"  {note}" for note in summary.notes[:_LISTED]]
        if len(summary.notes) > _LISTED:
            lines.append(f"  ... and {len(summary.notes) - _LISTED} more")
    lines.append("Train on it with the same bucket settings, e.g.:")
    lines += [
        "  [data]",
        f"  path = {json.dumps(str(summary.out.resolve()))}",
        f"  resolution = {options.resolution:g}",
        f'  resolution_type = "{options.resolution_type}"',
        f"  bucket_step = {options.bucket_step}",
        f"  max_aspect_ratio = {options.max_aspect_ratio:g}",
    ]
    if options.frames is not None:
        lines.append(f"  frames = {options.frames}")
    if options.control:
        lines += ["  [train]", '  method = "controlnet"']
    return "\n".join(lines)


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
