"""Aspect-ratio buckets: which sizes to train at, which bucket an image goes to, and how it is cropped.

All sizes are (width, height) in pixels and multiples of the model family's alignment `a` (16 for
Hunyuan-DiT: VAE factor 8 × patch size 2). Sizes are snapped with ``snap(x, a) = max(a, round(x / a) * a)``
where halves round up, so a size is never 0.
"""

from __future__ import annotations

import hashlib
import math

from dittune.data.types import Placement

MEGAPIXEL = 1024 * 1024
"""Unit of `resolution_type = "area"`: 1.0 means 1024×1024 pixels."""

RESOLUTION_TYPES = ("pixel", "area")
CROP_MODES = ("center", "random")

_RATIO_TOLERANCE = 1e-9
_TIE_DIGITS = 12


def snap(value: float, alignment: int) -> int:
    """`value` rounded to the nearest multiple of `alignment` (halves up), at least `alignment`."""
    if alignment <= 0:
        raise ValueError(f"alignment must be positive, got {alignment}")
    return max(alignment, math.floor(value / alignment + 0.5) * alignment)


def check_step(step: int, alignment: int) -> None:
    """Raise ValueError unless `step` is a positive multiple of `alignment`, suggesting a valid value."""
    if step > 0 and step % alignment == 0:
        return
    suggestion = snap(step, alignment)
    raise ValueError(
        f"data.bucket_step = {step} must be a positive multiple of the model alignment {alignment}; "
        f"use {suggestion} (the nearest valid value)."
    )


def square_bucket(resolution: float, resolution_type: str, alignment: int) -> tuple[int, int]:
    """The square training size: `resolution` pixels a side ("pixel") or `resolution` megapixels ("area")."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if resolution_type == "pixel":
        side = snap(resolution, alignment)
    elif resolution_type == "area":
        side = snap(math.sqrt(resolution * MEGAPIXEL), alignment)
    else:
        raise ValueError(f"resolution_type must be one of {RESOLUTION_TYPES}, got {resolution_type!r}")
    return side, side


def bucket_sizes(
    resolution: float, resolution_type: str, alignment: int, step: int, max_aspect_ratio: float
) -> list[tuple[int, int]]:
    """All bucket sizes, sorted and unique, the square bucket included.

    "pixel": the short edge is fixed at `resolution`; long edges grow by `step` up to `max_aspect_ratio`.
    "area": the area stays near `resolution` megapixels; the short edge shrinks by `step` from the square
    side and the long edge is the snapped area ÷ short edge, while long ÷ short ≤ `max_aspect_ratio`.
    """
    check_step(step, alignment)
    if max_aspect_ratio < 1:
        raise ValueError(f"max_aspect_ratio must be at least 1, got {max_aspect_ratio}")
    side, _ = square_bucket(resolution, resolution_type, alignment)
    sizes = {(side, side)}
    limit = max_aspect_ratio + _RATIO_TOLERANCE
    if resolution_type == "pixel":
        long_edge = side + step
        while long_edge / side <= limit:
            sizes.update({(long_edge, side), (side, long_edge)})
            long_edge += step
    else:
        area = resolution * MEGAPIXEL
        short_edge = side - step
        while short_edge >= alignment:
            long_edge = snap(area / short_edge, alignment)
            if long_edge / short_edge > limit:
                break
            sizes.update({(long_edge, short_edge), (short_edge, long_edge)})
            short_edge -= step
    return sorted(sizes)


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log space); ties go to the larger area,
    then to the smaller width."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}×{height}")
    target = math.log(width / height)

    def distance(bucket: tuple[int, int]) -> tuple[float, int, int]:
        gap = round(abs(math.log(bucket[0] / bucket[1]) - target), _TIE_DIGITS)
        return gap, -bucket[0] * bucket[1], bucket[0]

    return min(buckets, key=distance)


def place(width: int, height: int, bucket: tuple[int, int], crop: str, seed: int, key: str) -> Placement:
    """Resize (keeping the aspect ratio) so the image covers `bucket`, then choose the crop.

    "center" centres the crop (extra pixel to the right/bottom); "random" draws the offsets from a hash of
    (`seed`, `key`), so the same image and seed always get the same crop, on any machine.
    """
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}×{height}")
    bucket_width, bucket_height = bucket
    scale = max(bucket_width / width, bucket_height / height)
    resized = (
        max(bucket_width, math.floor(width * scale + 0.5)),
        max(bucket_height, math.floor(height * scale + 0.5)),
    )
    spare_x = resized[0] - bucket_width
    spare_y = resized[1] - bucket_height
    if crop == "center":
        left_top = (spare_x // 2, spare_y // 2)
    else:
        digest = hashlib.sha256(f"dittune-crop\0{seed}\0{key}".encode()).digest()
        left_top = (
            int.from_bytes(digest[:8], "big") % (spare_x + 1),
            int.from_bytes(digest[8:16], "big") % (spare_y + 1),
        )
    return Placement(bucket=(bucket_width, bucket_height), resized=resized, crop_left_top=left_top)
