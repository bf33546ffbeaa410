"""The procedural shapes dataset: deterministic, captioned, and the captions tell the truth."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from dittune.demo.shapes import DRAWN_SHAPES, RGB, main, make_shapes_dataset
from dittune.models.tiny_text import COLOURS, SHAPES

CAPTION = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = _files(make_shapes_dataset(tmp_path / "a", 9, seed=3))
    b = _files(make_shapes_dataset(tmp_path / "b", 9, seed=3))
    c = _files(make_shapes_dataset(tmp_path / "c", 9, seed=4))
    assert a == b
    assert a != c


def test_writes_images_captions_and_cycles_sizes(tmp_path: Path) -> None:
    sizes = ((64, 64), (96, 64), (64, 96))
    out = make_shapes_dataset(tmp_path / "data", 7, sizes=sizes)
    pngs = sorted(out.glob("*.png"))
    assert [p.stem for p in pngs] == [f"{i:05d}" for i in range(7)]
    for index, png in enumerate(pngs):
        with Image.open(png) as image:
            assert image.size == sizes[index % 3]
            assert image.mode == "RGB"
        assert CAPTION.match(png.with_suffix(".txt").read_text(encoding="utf-8"))


@pytest.mark.parametrize("shape", DRAWN_SHAPES)
def test_caption_colours_match_pixels(tmp_path: Path, shape: str) -> None:
    out = make_shapes_dataset(tmp_path / shape, 12, seed=1, shapes=(shape,), colours=tuple(RGB))
    for png in sorted(out.glob("*.png")):
        fill, drawn, background = CAPTION.match(png.with_suffix(".txt").read_text(encoding="utf-8")).groups()
        assert drawn == shape
        with Image.open(png) as image:
            pixels = list(image.getdata())
            corners = {image.getpixel(xy) for xy in ((0, 0), (image.width - 1, 0), (0, image.height - 1))}
        assert corners == {RGB[background]}
        shape_pixels = Counter(p for p in pixels if p != RGB[background])
        assert shape_pixels, f"{png.name}: no shape drawn"
        assert shape_pixels.most_common(1)[0][0] == RGB[fill]
        assert sum(shape_pixels.values()) > 0.05 * len(pixels), f"{png.name}: shape too small"


def test_chinese_captions_use_the_tokenizer_words(tmp_path: Path) -> None:
    out = make_shapes_dataset(tmp_path / "zh", 6, seed=2, chinese=True)
    english = make_shapes_dataset(tmp_path / "en", 6, seed=2)
    for zh_file in sorted(out.glob("*.txt")):
        fill, shape, background = CAPTION.match((english / zh_file.name).read_text(encoding="utf-8")).groups()
        assert zh_file.read_text(encoding="utf-8") == f"{COLOURS[background]}背景上的{COLOURS[fill]}{SHAPES[shape]}"
    assert _files(out).keys() == _files(english).keys()
    assert {k: v for k, v in _files(out).items() if k.endswith(".png")} == {
        k: v for k, v in _files(english).items() if k.endswith(".png")
    }


def test_rerun_does_not_touch_unchanged_files(tmp_path: Path) -> None:
    out = make_shapes_dataset(tmp_path / "data", 4)
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    make_shapes_dataset(tmp_path / "data", 4)
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_rejects_unknown_words(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown shape"):
        make_shapes_dataset(tmp_path, 1, shapes=("hexagon",))
    with pytest.raises(ValueError, match="unknown colour"):
        make_shapes_dataset(tmp_path, 1, colours=("red", "mauve"))
    with pytest.raises(ValueError, match="two distinct colours"):
        make_shapes_dataset(tmp_path, 1, colours=("red",))


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "cli"), "--count", "3", "--seed", "5", "--sizes", "48x32"]) == 0
    assert "3 images" in capsys.readouterr().out
    assert _files(tmp_path / "cli") == _files(make_shapes_dataset(tmp_path / "api", 3, seed=5, sizes=((48, 32),)))


def test_bilingual_alternates_languages_and_exclude_holds_out(tmp_path: Path) -> None:
    held = [("red", "circle", "blue"), ("green", "square", "white")]
    out = make_shapes_dataset(
        tmp_path / "data", 120, seed=2, shapes=("circle", "square"), colours=("red", "green", "blue", "white"),
        bilingual=True, exclude=held,
    )  # fmt: skip
    seen = set()
    for index, txt in enumerate(sorted(out.glob("*.txt"))):
        text = txt.read_text(encoding="utf-8")
        chinese = bool(re.search(r"[\u4e00-\u9fff]", text))
        assert chinese == (index % 2 == 1), text
        if not chinese:
            seen.add(CAPTION.match(text).groups())
    assert not seen & set(held)
    assert len(seen) > 10  # everything else still appears
    with pytest.raises(ValueError, match="excluded"):
        make_shapes_dataset(tmp_path / "none", 1, shapes=("circle",), colours=("red", "blue"),
                            exclude=[("red", "circle", "blue"), ("blue", "circle", "red")])  # fmt: skip
