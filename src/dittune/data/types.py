"""Plain records shared by the data layer and its users (no behaviour)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ImageRecord:
    """One discovered image with its caption and pixel size (read from the header)."""

    path: Path
    caption: str
    width: int
    height: int


@dataclass(frozen=True)
class Skipped:
    """An input that was left out, with the reason shown to the user."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Placement:
    """How an image becomes a bucket-sized crop: resize to `resized`, then crop at `crop_left_top`.

    All sizes are (width, height) in pixels; `bucket` is the final crop size.
    """

    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop_left_top: tuple[int, int]
