"""Validation grid labels: Latin prompts as written; other scripts need a font that has them."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dittune.validate import runner


def test_labels_fall_back_to_the_number_without_a_cjk_font(monkeypatch) -> None:
    monkeypatch.setattr(runner, "CJK_FONTS", ())
    monkeypatch.delenv("DITTUNE_LABEL_FONT", raising=False)
    assert runner._label_font("00 a red ring")[1] == "00 a red ring"
    assert runner._label_font("02 蓝色背景上的红色圆环")[1] == "02 (see prompts.txt)"
    monkeypatch.setenv("DITTUNE_LABEL_FONT", "/nonexistent/font.ttf")
    assert runner._label_font("蓝色")[1] == "(see prompts.txt)"


def test_grid_holds_every_image_with_a_label_strip() -> None:
    tiles = [(f"{i:02d} prompt", Image.new("RGB", (40, 40), (255, 0, 0))) for i in range(3)]
    grid = np.asarray(runner.make_grid(tiles, columns=2, min_tile=80))
    assert grid.shape == (2 * (80 + 14), 2 * 80, 3)
    assert (grid[:80, :160] == (255, 0, 0)).all()  # two enlarged tiles in the first row
    assert (grid[80:94, :80] < 128).any()  # label text under the first tile
