"""Simple, documented image statistics for the shapes demo (no model involved).

For an image of one shape on a flat background:

- **background**: the median RGB of the outermost 2-pixel frame;
- **shape pixels**: pixels farther than `FOREGROUND_DISTANCE` (Euclidean, 0–255 RGB) from the background;
- **shape colour**: the palette colour nearest to the median RGB of the shape pixels (none when
  shape pixels cover less than `MIN_SHAPE_FRACTION` of the image);
- **hollow**: the shape's bounding box (rows and columns holding at least 2 % of the shape's
  largest row/column count) has a centre patch (a fifth of the box's width and height) where shape
  pixels cover under 30 % — true for a ring, false for filled circles, squares, triangles and stars.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

FOREGROUND_DISTANCE = 60.0
MIN_SHAPE_FRACTION = 0.02
HOLLOW_CENTRE_COVERAGE = 0.3


@dataclass(frozen=True)
class ShapeReading:
    background: str
    colour: str | None
    shape_fraction: float
    hollow: bool


def _nearest(rgb: np.ndarray, palette: Mapping[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [float(np.linalg.norm(rgb - np.asarray(palette[name], dtype=np.float64))) for name in names]
    return names[int(np.argmin(distances))]


def shape_mask(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of shape pixels, background RGB) for an (H, W, 3) uint8 array."""
    frame = np.concatenate(
        [
            pixels[:2].reshape(-1, 3),
            pixels[-2:].reshape(-1, 3),
            pixels[:, :2].reshape(-1, 3),
            pixels[:, -2:].reshape(-1, 3),
        ]
    ).astype(np.float64)
    background = np.median(frame, axis=0)
    distance = np.linalg.norm(pixels.astype(np.float64) - background, axis=-1)
    return distance > FOREGROUND_DISTANCE, background


def is_hollow(mask: np.ndarray) -> bool:
    rows, cols = mask.sum(axis=1), mask.sum(axis=0)
    if not rows.any():
        return False
    row_idx = np.flatnonzero(rows >= max(1, 0.02 * rows.max()))
    col_idx = np.flatnonzero(cols >= max(1, 0.02 * cols.max()))
    top, bottom, left, right = row_idx[0], row_idx[-1] + 1, col_idx[0], col_idx[-1] + 1
    cy, cx = (top + bottom) / 2, (left + right) / 2
    half_h, half_w = max(1, round((bottom - top) / 10)), max(1, round((right - left) / 10))
    centre = mask[round(cy) - half_h : round(cy) + half_h, round(cx) - half_w : round(cx) + half_w]
    return bool(centre.size) and float(centre.mean()) < HOLLOW_CENTRE_COVERAGE


def read_shape(image: Image.Image | np.ndarray, palette: Mapping[str, tuple[int, int, int]]) -> ShapeReading:
    """Background colour, shape colour and hollowness of one generated image."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    mask, background = shape_mask(pixels)
    fraction = float(mask.mean())
    colour = (
        _nearest(np.median(pixels[mask].astype(np.float64), axis=0), palette)
        if fraction >= MIN_SHAPE_FRACTION
        else None
    )
    return ShapeReading(
        _nearest(background, palette), colour, fraction, fraction >= MIN_SHAPE_FRACTION and is_hollow(mask)
    )
