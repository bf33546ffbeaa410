"""A loss curve as a PNG (PIL only): raw logged values in grey, an exponential moving average on top."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT = 800, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 36, 46


def read_series(metrics: Path, key: str = "loss") -> tuple[list[int], list[float]]:
    """(steps, values) of `key` from a metrics.jsonl, skipping lines without a finite value."""
    steps, values = [], []
    for line in Path(metrics).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            value = float(record[key])
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if math.isfinite(value):
            steps.append(step)
            values.append(value)
    return steps, values


def moving_average(values: Sequence[float], weight: float) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
    smoothed, last, norm = [], 0.0, 0.0
    for value in values:
        last = weight * last + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        smoothed.append(last / norm)
    return smoothed


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = high - low or abs(high) or 1.0
    raw = span / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    start = math.ceil(low / step) * step
    return [start + i * step for i in range(int((high - start) / step) + 1)]


def plot_loss(metrics: Path, out: Path, title: str = "training loss", key: str = "loss") -> Path | None:
    """Draw `key` over steps from metrics.jsonl into `out`; returns None when there is nothing to plot."""
    steps, values = read_series(metrics, key)
    if len(values) < 2:
        return None
    smooth = moving_average(values, weight=min(0.98, 1 - 4 / len(values)) if len(values) > 8 else 0.0)
    low, high = min(values), max(values)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    first, last = steps[0], max(steps[-1], steps[0] + 1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def xy(step: float, value: float) -> tuple[float, float]:
        return LEFT + (step - first) / (last - first) * plot_w, TOP + (high - value) / (high - low) * plot_h

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([LEFT, TOP, LEFT + plot_w, TOP + plot_h], outline=(90, 90, 90))
    for value in _ticks(low, high):
        _, y = xy(first, value)
        draw.line([LEFT, y, LEFT + plot_w, y], fill=(232, 232, 232))
        draw.text((6, y - 6), f"{value:.4g}", fill="black")
    for step in _ticks(first, last):
        x, _ = xy(step, low)
        draw.line([x, TOP + plot_h, x, TOP + plot_h + 4], fill="black")
        draw.text((x - 10, TOP + plot_h + 8), f"{step:g}", fill="black")
    draw.line([xy(s, v) for s, v in zip(steps, values)], fill=(190, 190, 190), width=1)
    draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(31, 90, 200), width=2)
    draw.text((LEFT, 10), f"{title}  (grey: logged {key}, blue: moving average; last {smooth[-1]:.4f})", fill="black")
    draw.text((LEFT + plot_w // 2 - 12, HEIGHT - 18), "step", fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(out)
    return out
