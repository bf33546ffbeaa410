"""`crop`, the one functional transform diffusers' SD3 DreamBooth example imports."""

from __future__ import annotations

from PIL import Image


def crop(image: Image.Image, top: int, left: int, height: int, width: int) -> Image.Image:
    """The (height, width) box at (top, left); PIL pads with black where the box leaves the image."""
    return image.crop((left, top, left + width, top + height))
