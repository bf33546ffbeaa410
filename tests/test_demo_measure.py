"""The demo's image statistics read the drawn truth back from procedural images."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dittune.demo.measure import read_shape
from dittune.demo.shapes import DRAWN_SHAPES, RGB, make_shapes_dataset

CAPTION = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


@pytest.mark.parametrize("shape", DRAWN_SHAPES)
def test_reads_colours_and_hollowness_of_drawn_shapes(tmp_path: Path, shape: str) -> None:
    colours = ("red", "green", "blue", "yellow", "white", "black", "purple", "cyan")
    out = make_shapes_dataset(tmp_path, 16, seed=5, sizes=((80, 80), (128, 80)), shapes=(shape,), colours=colours)
    for png in sorted(out.glob("*.png")):
        fill, _, background = CAPTION.match(png.with_suffix(".txt").read_text()).groups()
        reading = read_shape(Image.open(png), {name: RGB[name] for name in colours})
        assert (reading.colour, reading.background) == (fill, background), png.name
        assert reading.hollow == (shape == "ring"), png.name
        assert 0.02 < reading.shape_fraction < 0.8


def test_blank_and_noisy_images() -> None:
    palette = {name: RGB[name] for name in ("red", "blue")}
    blank = np.zeros((64, 64, 3), np.uint8) + np.asarray(RGB["blue"], np.uint8)
    reading = read_shape(blank, palette)
    assert reading.colour is None and not reading.hollow and reading.background == "blue"
    noisy = blank.copy()
    noisy[20:44, 20:44] = RGB["red"]
    noisy = np.clip(noisy + np.random.default_rng(0).normal(0, 12, noisy.shape), 0, 255).astype(np.uint8)
    reading = read_shape(noisy, palette)
    assert reading.colour == "red" and not reading.hollow
    assert reading.shape_fraction == pytest.approx(24 * 24 / 64 / 64, abs=0.01)
