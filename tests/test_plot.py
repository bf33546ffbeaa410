"""The loss plot: reads metrics.jsonl robustly and draws the curve where the values are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dittune.train.plot import HEIGHT, WIDTH, moving_average, plot_loss, read_series


def _metrics(path: Path, losses: list[float]) -> Path:
    lines = [json.dumps({"step": i + 1, "loss": v, "lr": 1e-3}) for i, v in enumerate(losses)]
    path.write_text("\n".join([*lines, "not json", json.dumps({"step": 99})]) + "\n")
    return path


def test_read_series_skips_bad_lines(tmp_path: Path) -> None:
    steps, values = read_series(_metrics(tmp_path / "m.jsonl", [1.0, float("nan"), 0.5]))
    assert steps == [1, 3] and values == [1.0, 0.5]


def test_moving_average_is_bias_corrected() -> None:
    assert moving_average([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    smoothed = moving_average([1.0, 0.0], 0.5)
    assert smoothed == pytest.approx([1.0, 1 / 3])


def test_plot_draws_a_falling_curve(tmp_path: Path) -> None:
    losses = list(np.linspace(1.0, 0.1, 200))
    out = plot_loss(_metrics(tmp_path / "m.jsonl", losses), tmp_path / "plots" / "loss.png")
    assert out is not None
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert image.shape == (HEIGHT, WIDTH, 3)
    blue = (image[..., 2] > 150) & (image[..., 0] < 80)
    rows, cols = np.nonzero(blue)
    assert blue.sum() > 200
    left, right = cols < np.percentile(cols, 20), cols > np.percentile(cols, 80)
    assert rows[left].mean() < rows[right].mean() - 100  # high on the left, low on the right


def test_nothing_to_plot(tmp_path: Path) -> None:
    assert plot_loss(_metrics(tmp_path / "m.jsonl", [0.5]), tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()
