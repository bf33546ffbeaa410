"""Pixel loading: shape, range, crop, flip, colour conversion and decode errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dittune.data.buckets import place
from dittune.data.transforms import ImageLoadError, load_pixels
from dittune.data.types import Placement


def write_image(path: Path, pixels: np.ndarray, mode: str | None = None, **save_options: object) -> Path:
    Image.fromarray(pixels, mode=mode).save(path, **save_options)
    return path


def random_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_shape_dtype_and_range(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png", random_rgb(300, 200))
    placement = place(300, 200, (192, 128), "center", seed=0, key="a.png")
    pixels = load_pixels(path, placement, flip=False)
    assert pixels.shape == (3, 128, 192)
    assert pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels.min() < -0.9 and pixels.max() > 0.9  # random noise spans the range


def test_no_resize_crop_returns_the_exact_pixels(tmp_path: Path) -> None:
    rgb = random_rgb(64, 48)
    path = write_image(tmp_path / "a.png", rgb)
    placement = Placement(bucket=(32, 16), resized=(64, 48), crop_left_top=(5, 7))
    pixels = load_pixels(path, placement, flip=False)
    expected = torch.from_numpy(rgb[7:23, 5:37].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(pixels, expected)


def test_flip_is_an_exact_mirror_and_loading_is_deterministic(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.jpg", random_rgb(200, 150), format="JPEG")
    placement = place(200, 150, (128, 96), "random", seed=1, key="a.jpg")
    plain = load_pixels(path, placement, flip=False)
    flipped = load_pixels(path, placement, flip=True)
    assert torch.equal(flipped, plain.flip(-1))
    assert not torch.equal(flipped, plain)
    assert torch.equal(load_pixels(path, placement, flip=False), plain)


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (255, 0, 0, 255)  # opaque red left half, fully transparent black right half
    path = write_image(tmp_path / "a.png", rgba, mode="RGBA")
    pixels = load_pixels(path, Placement((16, 16), (16, 16), (0, 0)), flip=False)
    assert pixels[:, 0, 0].tolist() == [1.0, -1.0, -1.0]
    assert pixels[:, 0, 15].tolist() == [1.0, 1.0, 1.0]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    rgb = np.zeros((20, 40, 3), dtype=np.uint8)
    rgb[:, :20] = 255  # white left half of a 40×20 landscape image
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise: 20×40, white half on top
    path = write_image(tmp_path / "a.png", rgb, exif=exif.tobytes())
    pixels = load_pixels(path, Placement((20, 40), (20, 40), (0, 0)), flip=False)
    assert pixels.shape == (3, 40, 20)
    assert pixels[:, :20].mean() > 0.95 and pixels[:, 20:].mean() < -0.95


def test_greyscale_sixteen_bit_is_scaled_to_eight_bits(tmp_path: Path) -> None:
    grey = np.full((8, 8), 65535, dtype=np.uint16)
    grey[:, :4] = 0
    path = tmp_path / "g.png"
    Image.fromarray(grey).save(path)
    pixels = load_pixels(path, Placement((8, 8), (8, 8), (0, 0)), flip=False)
    assert pixels[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert pixels[:, 0, 7].tolist() == [1.0, 1.0, 1.0]


def test_truncated_image_raises_image_load_error(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(random_rgb(64, 64)).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[:-200])
    with pytest.raises(ImageLoadError, match="truncated") as caught:
        load_pixels(path, Placement((64, 64), (64, 64), (0, 0)), flip=False)
    assert caught.value.path == path
    assert str(caught.value) == caught.value.reason  # the reason alone; callers print it next to the path


def test_not_an_image_raises_image_load_error(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(b"garbage" * 20)
    with pytest.raises(ImageLoadError, match="cannot identify image file"):
        load_pixels(path, Placement((16, 16), (16, 16), (0, 0)), flip=False)


def test_crop_outside_the_resized_image_is_rejected(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png", random_rgb(32, 32))
    with pytest.raises(ValueError, match="does not fit"):
        load_pixels(path, Placement((32, 32), (32, 32), (4, 0)), flip=False)
