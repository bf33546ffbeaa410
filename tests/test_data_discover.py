"""Dataset discovery: folder scans, metadata files, bad inputs and caption policies."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.conftest import make_dataset

from dittune.data.discover import DataError, discover


def write_image(path: Path, width: int, height: int, fmt: str | None = None, **save_options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(width * 7 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt, **save_options)
    return path


def write_truncated_png(path: Path, width: int = 64, height: int = 48) -> Path:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def reasons_by_name(skipped: list) -> dict[str, str]:
    return {entry.path.name: entry.reason for entry in skipped}


def test_folder_scan_finds_nested_images_with_captions(tmp_path: Path) -> None:
    write_image(tmp_path / "b.png", 40, 30)
    (tmp_path / "b.txt").write_text("  a red barn \n")
    write_image(tmp_path / "sub" / "deep" / "a.JPG", 20, 60, "JPEG")
    (tmp_path / "sub" / "deep" / "a.txt").write_text("tall")
    write_image(tmp_path / ".hidden" / "c.png", 16, 16)
    (tmp_path / ".hidden" / "c.txt").write_text("ignored")
    (tmp_path / "notes.md").write_text("not an image")

    records, skipped = discover(tmp_path)

    assert [r.path.relative_to(tmp_path).as_posix() for r in records] == ["b.png", "sub/deep/a.JPG"]
    assert [r.caption for r in records] == ["a red barn", "tall"]
    assert [(r.width, r.height) for r in records] == [(40, 30), (20, 60)]
    assert skipped == []


def test_custom_caption_extension(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 16, 16)
    (tmp_path / "a.txt").write_text("wrong")
    (tmp_path / "a.caption").write_text("right")
    records, _ = discover(tmp_path, caption_extension="caption")
    assert records[0].caption == "right"


def test_exif_rotation_swaps_the_size(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    write_image(tmp_path / "rotated.jpg", 80, 40, "JPEG", exif=exif.tobytes())
    (tmp_path / "rotated.txt").write_text("x")
    records, _ = discover(tmp_path)
    assert (records[0].width, records[0].height) == (40, 80)


def test_corrupt_and_truncated_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    write_image(tmp_path / "good.png", 32, 32)
    (tmp_path / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    write_truncated_png(tmp_path / "truncated.png")
    for stem in ("good", "garbage", "truncated"):
        (tmp_path / f"{stem}.txt").write_text(stem)

    records, skipped = discover(tmp_path)

    assert [r.path.name for r in records] == ["good.png"]
    reasons = reasons_by_name(skipped)
    assert set(reasons) == {"garbage.png", "truncated.png"}
    assert "cannot identify image file" in reasons["garbage.png"]
    assert "truncated" in reasons["truncated.png"]


def test_missing_caption_skip(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 16, 16)
    (tmp_path / "a.txt").write_text("captioned")
    write_image(tmp_path / "b.png", 16, 16)
    records, skipped = discover(tmp_path, missing_caption="skip")
    assert [r.path.name for r in records] == ["a.png"]
    assert reasons_by_name(skipped) == {"b.png": "no caption file b.txt"}


def test_missing_caption_empty(tmp_path: Path) -> None:
    write_image(tmp_path / "b.png", 16, 16)
    records, skipped = discover(tmp_path, missing_caption="empty")
    assert [(r.path.name, r.caption) for r in records] == [("b.png", "")]
    assert skipped == []


def test_missing_caption_error_names_the_image(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 16, 16)
    (tmp_path / "a.txt").write_text("captioned")
    write_image(tmp_path / "b.png", 16, 16)
    with pytest.raises(DataError, match=r"b\.png.*no caption file b\.txt"):
        discover(tmp_path, missing_caption="error")


def test_metadata_jsonl(tmp_path: Path) -> None:
    write_image(tmp_path / "imgs" / "one.png", 24, 16)
    write_image(tmp_path / "two.png", 16, 24)
    write_image(tmp_path / "unlisted.png", 16, 16)
    lines = [
        json.dumps({"file_name": "two.png", "text": " second "}),
        "{not json",
        "",
        json.dumps({"file_name": "imgs/one.png", "text": "first"}),
        json.dumps({"file_name": "gone.png", "text": "missing"}),
        json.dumps({"text": "no file"}),
        json.dumps({"file_name": "../outside.png", "text": "escape"}),
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    records, skipped = discover(tmp_path)

    assert [(r.path.relative_to(tmp_path).as_posix(), r.caption) for r in records] == [
        ("imgs/one.png", "first"),
        ("two.png", "second"),
    ]
    assert (records[0].width, records[0].height) == (24, 16)
    reasons = [entry.reason for entry in skipped]
    assert any(reason.startswith("metadata.jsonl line 2: invalid JSON") for reason in reasons)
    assert "listed in metadata.jsonl line 5 but missing" in reasons
    assert "metadata.jsonl line 6: no file_name" in reasons
    assert any("line 7" in reason and "not inside the data folder" in reason for reason in reasons)
    assert len(skipped) == 4


def test_metadata_jsonl_without_text_column_is_an_error(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 16, 16)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match=r"metadata\.jsonl.*text"):
        discover(tmp_path)


def test_metadata_csv(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 32, 16)
    write_image(tmp_path / "b.webp", 16, 32, "WEBP")
    with open(tmp_path / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text", "extra"])
        writer.writerow(["b.webp", "a caption, with a comma", "1"])
        writer.writerow(["a.png", "plain", "2"])
        writer.writerow(["missing.png", "nope", "3"])

    records, skipped = discover(tmp_path)

    assert [(r.path.name, r.caption, r.width, r.height) for r in records] == [
        ("a.png", "plain", 32, 16),
        ("b.webp", "a caption, with a comma", 16, 32),
    ]
    assert reasons_by_name(skipped) == {"missing.png": "listed in metadata.csv line 4 but missing"}


def test_metadata_csv_missing_columns_names_file_and_columns(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 16, 16)
    (tmp_path / "metadata.csv").write_text("image,caption\na.png,x\n")
    with pytest.raises(DataError, match=r"metadata\.csv.*file_name, text"):
        discover(tmp_path)


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no images found"):
        discover(tmp_path)


def test_only_bad_files_error_lists_reasons(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"nope")
    (tmp_path / "bad.txt").write_text("x")
    with pytest.raises(DataError, match=r"1 input\(s\) skipped.*bad\.png.*cannot identify image file"):
        discover(tmp_path)


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        discover(tmp_path / "file")


def test_symlinked_folders_are_searched_and_loops_reported(tmp_path: Path) -> None:
    """A dataset assembled from links: a linked folder's images are found; a link back up is a loop, reported once
    and not followed."""
    elsewhere = make_dataset(tmp_path / "elsewhere", sizes=((64, 64),), colours=("red",))
    root = tmp_path / "data"
    make_dataset(root, sizes=((64, 64),), colours=("blue",))
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    records, skipped = discover(root)
    assert sorted(r.path.name for r in records) == ["blue_0.png", "red_0.png"]
    assert any(r.path.parent.name == "linked" for r in records)
    assert [s.reason for s in skipped if "symlink loop" in s.reason] == [
        f"a symlink loop (back to {root.resolve()}); not followed"
    ]
