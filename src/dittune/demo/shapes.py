"""A deterministic procedural dataset: one flat-coloured shape on a flat-coloured background.

Each image `NNNNN.png` gets a same-stem caption `NNNNN.txt`, "a red circle on a blue background"
(or "蓝色背景上的红色圆形" with `chinese=True`). Colour and shape words come from
`dittune.models.tiny_text`, so the tiny models' tokenizers know every word of every caption.

Shapes are drawn without antialiasing: every pixel is exactly the shape or the background colour,
and the shape never touches the image border. Output is a pure function of the arguments; files
whose bytes would not change are not rewritten (their mtimes stay, so stat fingerprints stay valid).

    python -m dittune.demo.shapes OUT_DIR --count 24 --seed 0 [--chinese]
"""

from __future__ import annotations

import argparse
import io
import math
import random
from collections.abc import Collection, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from dittune.models.tiny_text import COLOURS, SHAPES

RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "white": (250, 250, 250), "black": (15, 15, 15), "purple": (130, 40, 170), "orange": (245, 140, 20),
    "gray": (128, 128, 128), "pink": (245, 150, 190), "brown": (120, 70, 30), "cyan": (30, 210, 220),
}  # fmt: skip
"""Fill colour of every colour word in `tiny_text.COLOURS`."""

DRAWN_SHAPES = ("circle", "square", "triangle", "diamond", "star", "ring", "cross")
"""The shape words of `tiny_text.SHAPES` this module can draw."""

DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (96, 64), (64, 96))
DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DEFAULT_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "black")

_MARGIN = 2
"""Pixels kept free of the shape along every border (so the corners are always background)."""


def caption(fill: str, shape: str, background: str, chinese: bool = False) -> str:
    if chinese:
        return f"{COLOURS[background]}背景上的{COLOURS[fill]}{SHAPES[shape]}"
    return f"a {fill} {shape} on a {background} background"


def _polygon(cx: float, cy: float, radius: float, corners: int, rotation: float) -> list[tuple[float, float]]:
    return [
        (cx + radius * math.cos(rotation + 2 * math.pi * k / corners),
         cy + radius * math.sin(rotation + 2 * math.pi * k / corners))
        for k in range(corners)
    ]  # fmt: skip


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]):
    """Draw `shape` centred at (cx, cy) inside the circle of radius `r`."""
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        side = r / math.sqrt(2) * 1.3
        draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, -math.pi / 2), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4, -math.pi / 2), fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + math.pi * k / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(r * 0.35)))
    elif shape == "cross":
        arm = r * 0.3
        draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=fill)
        draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=fill)
    else:
        raise ValueError(f"cannot draw {shape!r}; drawable shapes: {', '.join(DRAWN_SHAPES)}")


def _check(sizes: Sequence[tuple[int, int]], shapes: Sequence[str], colours: Sequence[str]) -> None:
    if not sizes or not shapes:
        raise ValueError("sizes and shapes must not be empty")
    if len(set(colours)) < 2:
        raise ValueError("at least two distinct colours are needed (shape and background differ)")
    for name in shapes:
        if name not in DRAWN_SHAPES:
            raise ValueError(f"unknown shape {name!r}; choose from {', '.join(DRAWN_SHAPES)}")
    for name in colours:
        if name not in RGB:
            raise ValueError(f"unknown colour {name!r}; choose from {', '.join(RGB)}")
    for width, height in sizes:
        if min(width, height) < 16:
            raise ValueError(f"image size {width}×{height} is too small (sides of at least 16 pixels)")


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def make_shapes_dataset(
    out_dir: Path,
    count: int,
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    colours: Sequence[str] = DEFAULT_COLOURS,
    chinese: bool = False,
    bilingual: bool = False,
    exclude: Collection[tuple[str, str, str]] = (),
) -> Path:
    """Write `count` captioned images to `out_dir` (created if needed) and return it.

    Image i has size `sizes[i % len(sizes)]`; its shape, colours, scale and position are drawn from
    `random.Random(seed)`. `bilingual` captions odd-numbered images in Chinese, even ones in English;
    `exclude` lists (fill, shape, background) combinations never drawn (held out for evaluation).
    Other files in `out_dir` are left alone.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    _check(sizes, shapes, colours)
    excluded = set(exclude)
    palette = list(dict.fromkeys(colours))
    allowed = [
        (fill, shape, background)
        for fill in palette
        for shape in shapes
        for background in palette
        if fill != background and (fill, shape, background) not in excluded
    ]
    if not allowed:
        raise ValueError("every (fill, shape, background) combination is excluded")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    width_digits = max(5, len(str(count - 1)))
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        shape = rng.choice(list(shapes))
        fill = rng.choice(palette)
        background = rng.choice([c for c in palette if c != fill])
        while (fill, shape, background) in excluded:
            fill, shape, background = rng.choice(allowed)
        limit = min(width, height) / 2 - _MARGIN
        radius = limit * rng.uniform(0.55, 0.95)
        cx = rng.uniform(_MARGIN + radius, width - _MARGIN - radius)
        cy = rng.uniform(_MARGIN + radius, height - _MARGIN - radius)

        image = Image.new("RGB", (width, height), RGB[background])
        draw_shape(ImageDraw.Draw(image), shape, cx, cy, radius, RGB[fill])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        stem = f"{index:0{width_digits}d}"
        _write_if_changed(out / f"{stem}.png", buffer.getvalue())
        _write_if_changed(
            out / f"{stem}.txt",
            caption(fill, shape, background, chinese or (bilingual and index % 2 == 1)).encode("utf-8"),
        )
    return out


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 96x64, got {text!r}") from None
    return width, height


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dittune.demo.shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--count", type=int, default=24, metavar="N", help="number of images (default 24)")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    language = parser.add_mutually_exclusive_group()
    language.add_argument("--chinese", action="store_true", help="Chinese captions instead of English")
    language.add_argument("--bilingual", action="store_true", help="alternate English and Chinese captions")
    parser.add_argument(
        "--sizes", type=_size, nargs="+", default=list(DEFAULT_SIZES), metavar="WxH", help="image sizes, cycled"
    )
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), choices=DRAWN_SHAPES, metavar="SHAPE")
    parser.add_argument("--colours", nargs="+", default=list(DEFAULT_COLOURS), choices=list(RGB), metavar="COLOUR")
    args = parser.parse_args(argv)
    try:
        out = make_shapes_dataset(
            args.out_dir, args.count, args.seed, args.sizes, args.shapes, args.colours,
            chinese=args.chinese, bilingual=args.bilingual,
        )  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    print(f"{args.count} images with captions in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
