"""Find training images (and, for video families, clips) and their captions in a data folder.

Three layouts are understood, checked in this order:

1. ``metadata.jsonl``: one JSON object per line with ``file_name`` (relative to the folder) and ``text``.
2. ``metadata.csv``: a header row containing ``file_name`` and ``text``.
3. A plain folder, searched recursively: every image (or video) file with a same-stem caption file next
   to it (``photo.png`` + ``photo.txt``). Files and folders whose names start with "." are ignored.

With `video=True` the video suffixes (``.mp4 .webm .mov .mkv .gif`` ...) are clips, probed through PyAV
for their size, frame count and timestamps; still images in the same folder become 1-frame clips. With
`video=False` a video file is listed as skipped (the family trains on images), and a GIF is a still.

With `control=True` (ControlNet training) every sample also needs its conditioning image: the file
``<stem>_control.<image suffix>`` next to it (``photo.png`` + ``photo_control.png``; any size), or the path
in a ``control`` column of the metadata (relative to the folder, like ``file_name``; a row without one falls
back to the sibling file). Files named ``*_control.*`` are then never samples themselves, and clips are refused.

A bad input (unreadable image, missing file, broken metadata line) never raises: it is returned as a
`Skipped` with a reason for the user. Only problems that make the whole dataset unusable raise `DataError`.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from dittune.data.types import ImageRecord, Skipped
from dittune.data.video import VIDEO_EXTENSIONS, VideoInfo, VideoSupportMissing, probe_video, require_av

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""Suffixes (lower case) picked up by the folder scan."""

METADATA_JSONL = "metadata.jsonl"
METADATA_CSV = "metadata.csv"
REQUIRED_COLUMNS = ("file_name", "text")
MISSING_CAPTION_MODES = ("skip", "empty", "error")
CONTROL_SUFFIX = "_control"
"""A file stem ending in this is the conditioning image of the same-stem image (ControlNet training)."""
CONTROL_COLUMN = "control"
STILLS_ONLY_REASON = "ControlNet training takes still images"

_EXIF_ORIENTATION_TAG = 0x0112
_ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_REASONS_SHOWN_IN_ERRORS = 5
_MAX_CHECK_THREADS = 8


class DataError(ValueError):
    """The dataset as a whole cannot be used; the message says why and what to change."""


@dataclass(frozen=True)
class _Candidate:
    """An image to check: where it is and its caption (None when it has none)."""

    path: Path
    rel: str
    caption: str | None
    missing_caption_reason: str
    control: Path | None = None
    """The conditioning image found for it (only looked for with `control=True`)."""
    missing_control_reason: str = ""


def discover(
    root: Path,
    caption_extension: str = ".txt",
    missing_caption: str = "skip",
    video: bool = False,
    control: bool = False,
) -> tuple[list[ImageRecord], list[Skipped]]:
    """Return the usable images under `root` (sorted by relative path) and the skipped inputs.

    `missing_caption`: "skip" lists an uncaptioned image as skipped, "empty" keeps it with caption "",
    "error" raises `DataError`. Image sizes are read from the header (EXIF rotation applied); every image
    is also checked to decode, so truncated or corrupt files are skipped here rather than mid-training.
    `control`: every record also gets its conditioning image (see the module notes), checked the same way;
    a still without a usable one, and every clip, is skipped with the reason.
    """
    root = Path(root)
    if missing_caption not in MISSING_CAPTION_MODES:
        raise ValueError(f"missing_caption must be one of {MISSING_CAPTION_MODES}, got {missing_caption!r}")
    if not root.exists():
        raise DataError(f"data.path: {root} does not exist.")
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder.")

    skipped: list[Skipped] = []
    finder = _ControlFinder() if control else None
    if (root / METADATA_JSONL).is_file():
        candidates = _from_jsonl(root, root / METADATA_JSONL, skipped, finder)
    elif (root / METADATA_CSV).is_file():
        candidates = _from_csv(root, root / METADATA_CSV, skipped, finder)
    else:
        candidates = _from_folder(root, _normalise_extension(caption_extension), skipped, video, finder)
    if control:
        candidates = _with_controls(candidates, skipped, video)

    captioned: list[tuple[_Candidate, str]] = []
    for candidate in sorted(candidates, key=lambda c: c.rel):
        if candidate.caption is not None:
            captioned.append((candidate, candidate.caption))
        elif missing_caption == "empty":
            captioned.append((candidate, ""))
        elif missing_caption == "error":
            raise DataError(
                f'{candidate.path}: {candidate.missing_caption_reason} (data.missing_caption = "error"). '
                'Add the caption, or set data.missing_caption = "skip" or "empty".'
            )
        else:
            skipped.append(Skipped(candidate.path, candidate.missing_caption_reason))

    records: list[ImageRecord] = []
    checked = _check_media([c.path for c, _ in captioned], video)
    controls = _check_media([c.control for c, _ in captioned if c.control is not None], False)
    control_checks = iter(controls)
    for (candidate, caption), found in zip(captioned, checked):
        control_found = next(control_checks) if candidate.control is not None else None
        if isinstance(found, str):
            skipped.append(Skipped(candidate.path, found))
        elif isinstance(control_found, str):
            assert candidate.control is not None
            skipped.append(Skipped(candidate.path, f"control image {candidate.control.name}: {control_found}"))
        elif isinstance(found, tuple):
            control_size = control_found if isinstance(control_found, tuple) else None
            records.append(
                ImageRecord(candidate.path, caption, *found, control=candidate.control, control_size=control_size)
            )
        else:
            records.append(
                ImageRecord(
                    candidate.path,
                    caption,
                    found.width,
                    found.height,
                    found.frames,
                    found.fps,
                    found.variable_rate,
                    found.times,
                )
            )

    skipped.sort(key=lambda s: (s.path.as_posix(), s.reason))
    if not records:
        raise DataError(_nothing_usable_message(root, skipped, video))
    return records, skipped


def check_image(path: Path) -> tuple[int, int] | str:
    """The displayed (width, height) of a decodable image, or a human reason why it cannot be used.

    The size comes from the header, swapped when the EXIF orientation is a 90° rotation (5-8). The image
    is also decoded once to catch truncated files; JPEG at reduced scale, which is much cheaper.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            width, height = image.size
            if _exif_orientation(image) in _ROTATED_ORIENTATIONS:
                width, height = height, width
            if image.format == "JPEG":
                image.draft("RGB", (1, 1))
            image.load()
    except FileNotFoundError:
        return "file not found"
    except Image.DecompressionBombError as error:
        return f"image too large to open safely ({error})"
    except Image.UnidentifiedImageError:
        return "cannot identify image file (not an image, or an unsupported format)"
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        return f"image is truncated or corrupt ({error})"
    if width <= 0 or height <= 0:
        return f"image has no pixels ({width}×{height})"
    return width, height


def is_clip(path: Path, video: bool) -> bool:
    """Whether `path` is read as a video: a video suffix, for a family that trains on clips."""
    return video and path.suffix.lower() in VIDEO_EXTENSIONS


def _check_media(paths: list[Path], video: bool) -> list[tuple[int, int] | VideoInfo | str]:
    """`check_image` or `probe_video` for each path, in order (threads only speed up the I/O and decoding)."""
    if any(is_clip(path, video) for path in paths):
        try:
            require_av()
        except VideoSupportMissing as error:
            raise DataError(f"data.path contains videos, but {error}.") from None

    def check(path: Path) -> tuple[int, int] | VideoInfo | str:
        return probe_video(path) if is_clip(path, video) else check_image(path)

    if len(paths) < 2:
        return [check(path) for path in paths]
    threads = min(_MAX_CHECK_THREADS, os.cpu_count() or 1, len(paths))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(check, paths))


def _exif_orientation(image: Image.Image) -> int | None:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) else None


def _normalise_extension(extension: str) -> str:
    extension = extension.strip()
    if not extension:
        raise ValueError('caption_extension must not be empty (e.g. ".txt")')
    return extension if extension.startswith(".") else "." + extension


def _is_hidden(rel_parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") for part in rel_parts)


def _from_folder(
    root: Path, caption_extension: str, skipped: list[Skipped], video: bool, finder: _ControlFinder | None
) -> list[_Candidate]:
    candidates: list[_Candidate] = []
    suffixes = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
    stems: set[tuple[Path, str]] = set()
    controls: list[Path] = []
    for path in _walk(root, skipped):
        rel_path = path.relative_to(root)
        suffix = path.suffix.lower()
        if _is_hidden(rel_path.parts) or suffix not in suffixes or not path.is_file():
            continue
        if finder is not None and suffix in IMAGE_EXTENSIONS and _is_control_name(path):
            controls.append(path)  # a conditioning image, never a sample
            continue
        stems.add((path.parent, path.stem))
        if suffix not in IMAGE_EXTENSIONS and not video:
            skipped.append(Skipped(path, "a video file; this model family trains on still images"))
            continue
        caption_path = path.with_suffix(caption_extension)
        caption: str | None = None
        reason = f"no caption file {caption_path.name}"
        if caption_path.is_file():
            try:
                caption = caption_path.read_text(encoding="utf-8-sig").strip()
            except UnicodeDecodeError:
                skipped.append(Skipped(path, _not_utf8_reason(caption_path)))
                continue
            except OSError as error:
                skipped.append(Skipped(path, f"cannot read caption file {caption_path.name} ({error})"))
                continue
        control, missing_control = _sibling_control(path, finder, "") if finder is not None else (None, "")
        candidates.append(_Candidate(path, rel_path.as_posix(), caption, reason, control, missing_control))
    for path in controls:
        base = path.stem[: -len(CONTROL_SUFFIX)]
        if (path.parent, base) not in stems:
            skipped.append(Skipped(path, f"a control image without its image ({base}.<suffix> next to it)"))
    return candidates


def _walk(root: Path, skipped: list[Skipped]) -> list[Path]:
    """Every file under `root`, sorted, following symlinked folders (a dataset assembled from links); a link back to
    a folder already being searched (a loop) is listed as skipped, not followed."""
    files: list[Path] = []
    seen: set[str] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        here = os.path.realpath(folder)
        if here in seen:
            subfolders.clear()
            continue
        seen.add(here)
        for name in list(subfolders):
            target = os.path.realpath(os.path.join(folder, name))
            if target in seen or (here + os.sep).startswith(target + os.sep):
                subfolders.remove(name)
                skipped.append(Skipped(Path(folder) / name, f"a symlink loop (back to {target}); not followed"))
        files += [Path(folder) / name for name in names]
    return sorted(files)


def _not_utf8_reason(caption_path: Path) -> str:
    """Why a caption file was refused: where its first non-UTF-8 byte is, and the fix."""
    data = caption_path.read_bytes()
    try:
        data.decode("utf-8")
        position, byte = 0, 0
    except UnicodeDecodeError as error:
        position, byte = error.start, data[error.start]
    return (
        f"caption file {caption_path.name} is not UTF-8 text (byte 0x{byte:02x} at offset {position}, "
        "e.g. Latin-1); save it as UTF-8"
    )


def _from_jsonl(root: Path, metadata: Path, skipped: list[Skipped], finder: _ControlFinder | None) -> list[_Candidate]:
    rows: list[tuple[int, dict[str, object]]] = []
    seen_columns: set[str] = set()
    for line_number, line in _numbered_lines(metadata):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            skipped.append(Skipped(metadata, f"{metadata.name} line {line_number}: invalid JSON ({error.msg})"))
            continue
        if not isinstance(row, dict):
            skipped.append(Skipped(metadata, f"{metadata.name} line {line_number}: not a JSON object"))
            continue
        seen_columns.update(row)
        rows.append((line_number, row))
    if rows:
        _require_columns(metadata, seen_columns)
    return _rows_to_candidates(root, metadata, rows, skipped, finder)


def _from_csv(root: Path, metadata: Path, skipped: list[Skipped], finder: _ControlFinder | None) -> list[_Candidate]:
    try:
        with open(metadata, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            _require_columns(metadata, set(reader.fieldnames or ()))
            # Line numbers count the header as line 1, as an editor shows them.
            rows = [(reader.line_num, dict(row)) for row in reader]
    except UnicodeDecodeError as error:
        raise DataError(f"{metadata}: not UTF-8 text ({error}).") from error
    except csv.Error as error:
        raise DataError(f"{metadata}: malformed CSV ({error}).") from error
    return _rows_to_candidates(root, metadata, rows, skipped, finder)


def _numbered_lines(metadata: Path) -> Iterator[tuple[int, str]]:
    try:
        text = metadata.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{metadata}: not UTF-8 text ({error}).") from error
    yield from enumerate(text.splitlines(), start=1)


def _require_columns(metadata: Path, columns: set[str]) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        found = ", ".join(sorted(columns)) or "none"
        raise DataError(
            f"{metadata}: missing required column(s) {', '.join(missing)} "
            f"(needs {' and '.join(REQUIRED_COLUMNS)}; found: {found})."
        )


def _rows_to_candidates(
    root: Path,
    metadata: Path,
    rows: list[tuple[int, dict[str, object]]],
    skipped: list[Skipped],
    finder: _ControlFinder | None = None,
) -> list[_Candidate]:
    candidates: list[_Candidate] = []
    first_line_by_rel: dict[str, int] = {}
    for line_number, row in rows:
        where = f"{metadata.name} line {line_number}"
        file_name = row.get("file_name")
        if not isinstance(file_name, str) or not file_name.strip():
            skipped.append(Skipped(metadata, f"{where}: no file_name"))
            continue
        rel = _relative(file_name)
        path = root / rel
        if not _inside(rel):
            skipped.append(Skipped(path, f"listed in {where} but not inside the data folder"))
            continue
        if rel in first_line_by_rel:
            skipped.append(Skipped(path, f"listed again in {where} (first on line {first_line_by_rel[rel]})"))
            continue
        first_line_by_rel[rel] = line_number
        if not path.is_file():
            skipped.append(Skipped(path, f"listed in {where} but missing"))
            continue
        text = row.get("text")
        if text is not None and not isinstance(text, str):
            skipped.append(Skipped(path, f"{where}: text is not a string"))
            continue
        caption = text.strip() if isinstance(text, str) else None
        control, missing_control = _row_control(root, path, row, where, finder) if finder else (None, "")
        candidates.append(_Candidate(path, rel, caption, f"no text in {where}", control, missing_control))
    return candidates


def _relative(file_name: str) -> str:
    """A metadata path as a normalised POSIX path (backslashes read as separators)."""
    return posixpath.normpath(file_name.strip().replace("\\", "/"))


def _inside(rel: str) -> bool:
    return not (PurePosixPath(rel).is_absolute() or rel == ".." or rel.startswith("../"))


def _is_control_name(path: Path) -> bool:
    return path.stem.endswith(CONTROL_SUFFIX)


class _ControlFinder:
    """Finds ``<stem>_control.<image suffix>`` files next to an image, listing each folder once."""

    def __init__(self) -> None:
        self._by_folder: dict[Path, dict[str, list[Path]]] = {}

    def siblings(self, path: Path) -> list[Path]:
        found = self._by_folder.get(path.parent)
        if found is None:
            found = {}
            try:
                entries = sorted(path.parent.iterdir())
            except OSError:
                entries = []
            for entry in entries:
                if entry.suffix.lower() in IMAGE_EXTENSIONS and _is_control_name(entry) and entry.is_file():
                    found.setdefault(entry.stem[: -len(CONTROL_SUFFIX)], []).append(entry)
            self._by_folder[path.parent] = found
        return found.get(path.stem, [])


def _sibling_control(path: Path, finder: _ControlFinder, where: str) -> tuple[Path | None, str]:
    """(the control image next to `path`, "") or (None, why there is none); `where`: the metadata line, if any."""
    found = finder.siblings(path)
    if len(found) == 1:
        return found[0], ""
    if found:
        return None, f"several control images ({', '.join(p.name for p in found)}); keep one"
    looked = f"{path.stem}{CONTROL_SUFFIX}.<image suffix> next to it"
    if where:
        return None, f"no control image: no {CONTROL_COLUMN!r} value in {where}, and no {looked}"
    return None, f"no control image {looked}"


def _row_control(
    root: Path, path: Path, row: dict[str, object], where: str, finder: _ControlFinder
) -> tuple[Path | None, str]:
    """The control image a metadata row names (relative to `root`), else the sibling file of its image."""
    value = row.get(CONTROL_COLUMN)
    if value is None or (isinstance(value, str) and not value.strip()):
        return _sibling_control(path, finder, where)
    if not isinstance(value, str):
        return None, f"{where}: {CONTROL_COLUMN} is not a string"
    rel = _relative(value)
    if not _inside(rel):
        return None, f"control image {value} in {where} is not inside the data folder"
    control = root / rel
    if not control.is_file():
        return None, f"control image {rel} listed in {where} is missing"
    return control, ""


def _with_controls(candidates: list[_Candidate], skipped: list[Skipped], video: bool) -> list[_Candidate]:
    """The candidates that can train a ControlNet: stills that have a control image (the others are skipped)."""
    kept: list[_Candidate] = []
    for candidate in candidates:
        if is_clip(candidate.path, video):
            skipped.append(Skipped(candidate.path, STILLS_ONLY_REASON))
        elif _is_control_name(candidate.path):
            skipped.append(
                Skipped(candidate.path, f"named like a control image (*{CONTROL_SUFFIX}.*), so not a training sample")
            )
        elif candidate.control is None:
            skipped.append(Skipped(candidate.path, candidate.missing_control_reason))
        else:
            kept.append(candidate)
    return kept


def _nothing_usable_message(root: Path, skipped: list[Skipped], video: bool) -> str:
    if not skipped:
        kinds = "images or videos" if video else "images"
        suffixes = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS if video else IMAGE_EXTENSIONS
        return (
            f"data.path: no {kinds} found in {root} (looked for {', '.join(sorted(suffixes))}, "
            f"or a {METADATA_JSONL} / {METADATA_CSV} listing them)."
        )
    shown = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:_REASONS_SHOWN_IN_ERRORS])
    more = len(skipped) - _REASONS_SHOWN_IN_ERRORS
    suffix = f"; ... and {more} more" if more > 0 else ""
    return f"data.path: no usable image in {root}; {len(skipped)} input(s) skipped: {shown}{suffix}."
