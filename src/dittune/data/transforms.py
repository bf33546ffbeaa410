"""Turn an image file into the bucket-sized pixel tensor the VAE encodes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from dittune.data.types import Placement

if TYPE_CHECKING:  # imported where pixels are made, so discovery (`dittune config check`) runs without torch
    import torch

RESIZE_METHOD = "lanczos-v1"
"""Identifies the pixel pipeline below (part of latent cache keys); bump it whenever the output changes."""

_WHITE = (255, 255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


class ImageLoadError(Exception):
    """An image could not be decoded. The message is the human `reason` alone (callers list it next to
    the path); `path` is kept as an attribute."""

    def __init__(self, reason: str, path: Path | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path


def load_pixels(path: Path, placement: Placement, flip: bool) -> torch.Tensor:
    """Load `path` as a float32 (3, H, W) tensor in [-1, 1] at `placement.bucket` size.

    Steps: apply the EXIF orientation, convert to RGB (transparency composited on white), resize to
    `placement.resized` with Lanczos (PIL's LANCZOS filter; antialiased when shrinking), crop the bucket at
    `placement.crop_left_top`, and mirror left-right when `flip`. The result is bit-identical for the same
    file and arguments. Raises `ImageLoadError` when the file cannot be decoded.
    """
    try:
        with Image.open(path) as image:
            rgb = to_rgb(ImageOps.exif_transpose(image))
            resized = rgb.resize(placement.resized, Image.Resampling.LANCZOS)
    except FileNotFoundError as error:
        raise ImageLoadError("file not found", path) from error
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"image too large to open safely ({error})", path) from error
    except Image.UnidentifiedImageError as error:
        raise ImageLoadError("cannot identify image file (not an image, or unsupported)", path) from error
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise ImageLoadError(f"image is truncated or corrupt ({error})", path) from error

    return pixels_from_image(resized, placement, flip, path, resized=True)


def pixels_from_image(
    image: Image.Image, placement: Placement, flip: bool, path: Path | None = None, resized: bool = False
) -> torch.Tensor:
    """An RGB image resized to `placement.resized` (Lanczos; skipped when `resized`), cropped to the bucket
    and mirrored when `flip`: float32 (3, H, W) in [-1, 1]. `path` only names the source in errors."""
    if not resized:
        image = to_rgb(image).resize(placement.resized, Image.Resampling.LANCZOS)
    left, top = placement.crop_left_top
    width, height = placement.bucket
    if left < 0 or top < 0 or left + width > image.width or top + height > image.height:
        raise ValueError(
            f"crop {width}×{height} at ({left}, {top}) does not fit the resized image "
            f"{image.width}×{image.height} of {path}"
        )
    import torch

    cropped = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.array(cropped, dtype=np.uint8)).permute(2, 0, 1)
    if flip:
        pixels = pixels.flip(-1)
    return pixels.to(torch.float32) / 127.5 - 1.0


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `image`: alpha composited on white; integer grey modes are read as 16-bit."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.int64).clip(0, 65535)
        grey = (grey * 255 + 32767) // 65535
        return Image.fromarray(grey.astype(np.uint8), mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
