"""`dittune prepare`: images and clips written at their buckets, videos cut into clips, captions carried over."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_clip, make_dataset
from dittune.cli.main import main
from dittune.data.buckets import assign_bucket, bucket_sizes
from dittune.data.discover import discover
from dittune.data.report import ClipOptions, DatasetPlan, plan_dataset
from dittune.data.transforms import load_pixels, pixels_from_image
from dittune.data.video import decode_frames, probe_video
from dittune.models.facts import FrameRule
from dittune.models.registry import facts_class

BUCKETS = ["--resolution", "32", "--bucket-step", "16"]
"""32 px short edge, buckets every 16 px up to 2:1 (32×32, 48×32, 64×32 and the tall ones)."""


def _plan(
    root: Path,
    video: bool = False,
    clips: ClipOptions | None = None,
    control: bool = False,
    crop: str = "center",
    crop_seed: int = 0,
) -> DatasetPlan:
    """Discover and plan `root` as training would at `BUCKETS` (alignment 16)."""
    records, skipped = discover(root, video=video, control=control)
    return plan_dataset(
        records,
        root,
        resolution=32,
        resolution_type="pixel",
        alignment=16,
        step=16,
        max_aspect_ratio=2.0,
        crop=crop,
        crop_seed=crop_seed,
        batch_size=1,
        incomplete_batches="keep",
        skipped=skipped,
        clips=clips or ClipOptions(),
    )


def _uint8(pixels: torch.Tensor) -> np.ndarray:
    """A (3, H, W) tensor in [-1, 1] as an (H, W, 3) array of 0–255 floats."""
    return ((pixels + 1.0) * 127.5).permute(1, 2, 0).numpy().astype(float)


def _source_frames(source: Path, key: str, count: int) -> list[np.ndarray]:
    """Every frame of video `key` in `source`, placed in its bucket as training places it."""
    (sample,) = [s for s in _plan(source, video=True).samples if s.key == key]
    frames = decode_frames(sample.record.path, tuple(range(count)))
    return [_uint8(pixels_from_image(frame, sample.placement, flip=False)) for frame in frames]


def _nearest(clip: Path, count: int, sources: list[np.ndarray]) -> list[int]:
    """For each frame of `clip`, the index of the source frame it is closest to (the disc moves every frame)."""
    frames = [np.asarray(frame, dtype=float) for frame in decode_frames(clip, tuple(range(count)))]
    return [int(np.argmin([np.abs(frame - source).mean() for source in sources])) for frame in frames]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


def test_images_are_written_at_their_buckets_and_train_without_resize(tmp_path: Path) -> None:
    source = make_dataset(tmp_path / "in", sizes=((64, 64), (96, 64), (36, 80)), colours=("red", "blue"))
    out = tmp_path / "out"
    assert main(["prepare", str(source), str(out), *BUCKETS]) == 0

    planned = {sample.key: sample for sample in _plan(source).samples}
    rows = _rows(out)
    assert sorted(row["source"] for row in rows) == sorted(planned)
    for row in rows:
        sample = planned[row["source"]]
        assert row["text"] == sample.record.caption == (source / row["source"]).with_suffix(".txt").read_text()
        with Image.open(out / row["file_name"]) as image:
            assert image.format == "PNG"
            assert image.size == sample.placement.bucket
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1.0
        # The very pixels training on IN would encode.
        assert torch.equal(pixels, load_pixels(sample.record.path, sample.placement, flip=False))
    assert len({sample.placement.bucket for sample in planned.values()}) == 3

    # Training on OUT at the same settings: same bucket, nothing resized or cropped.
    again = _plan(out).samples
    assert len(again) == len(rows)
    by_name = {row["file_name"]: planned[row["source"]] for row in rows}
    for sample in again:
        assert sample.placement.bucket == by_name[sample.key].placement.bucket
        assert sample.placement.resized == sample.placement.bucket == (sample.record.width, sample.record.height)
        assert sample.placement.crop_left_top == (0, 0)


def test_long_video_is_cut_into_clips_of_n_frames(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "in"
    make_clip(source / "long.mp4", frames=20, fps=8.0, size=(64, 48))
    (source / "long.txt").write_text("a red ball rolling to the right")
    make_clip(source / "short.mp4", frames=3, fps=8.0, size=(64, 48))
    (source / "short.txt").write_text("too short")
    out = tmp_path / "out"
    assert main(["prepare", str(source), str(out), *BUCKETS, "--frames", "6"]) == 0
    report = capsys.readouterr().out
    assert "3 clip(s) from 1 video(s)" in report
    assert "short.mp4: video has 3 frames" in report and "needs 6" in report

    bucket = assign_bucket(64, 48, bucket_sizes(32, "pixel", 16, 16, 2.0))
    rows = _rows(out)
    assert [row["file_name"] for row in rows] == ["long_000.mp4", "long_001.mp4", "long_002.mp4"]
    assert {row["text"] for row in rows} == {"a red ball rolling to the right"}
    infos = [probe_video(out / row["file_name"]) for row in rows]
    assert all(not isinstance(info, str) for info in infos), infos
    assert [(info.width, info.height, info.frames) for info in infos] == [(*bucket, 6)] * 3
    assert all(info.fps == pytest.approx(8.0) for info in infos)

    # Clip k holds source frames 6k … 6k+5, in order.
    sources = _source_frames(source, "long.mp4", 20)
    for clip, row in enumerate(rows):
        assert _nearest(out / row["file_name"], 6, sources) == list(range(6 * clip, 6 * clip + 6))

    # Training on OUT with data.frames = 6 takes each clip whole, at its size.
    clips = ClipOptions(rule=FrameRule(1), frames=6)
    for sample in _plan(out, video=True, clips=clips).samples:
        assert sample.placement.frame_indices == tuple(range(6))
        assert sample.placement.resized == sample.placement.bucket == bucket


def test_fps_stride_and_max_clips(tmp_path: Path) -> None:
    source = tmp_path / "in"
    make_clip(source / "ball.mp4", frames=20, fps=8.0, size=(64, 64))
    (source / "ball.txt").write_text("a ball")
    out = tmp_path / "out"
    # At 4 fps the 20 frames (2.375 s) give 10; clips of 4 starting every 2 frames: 4 fit, 3 asked.
    args = ["--frames", "4", "--fps", "4", "--stride", "2", "--max-clips", "3"]
    assert main(["prepare", str(source), str(out), *BUCKETS, *args]) == 0
    rows = _rows(out)
    infos = [probe_video(out / row["file_name"]) for row in rows]
    assert len(infos) == 3
    assert all(info.frames == 4 and info.fps == pytest.approx(4.0) for info in infos)
    # Every second source frame; clip k starts 2 clip frames (4 source frames) after clip k - 1.
    sources = _source_frames(source, "ball.mp4", 20)
    for clip, row in enumerate(rows):
        assert _nearest(out / row["file_name"], 4, sources) == [4 * clip + 2 * j for j in range(4)]


def test_metadata_input_keeps_folders_and_jpeg(tmp_path: Path) -> None:
    source = tmp_path / "in"
    (source / "sub").mkdir(parents=True)
    Image.new("RGB", (80, 40), (200, 30, 30)).save(source / "sub" / "wide.jpg", quality=90)
    Image.new("RGB", (40, 40), (30, 30, 200)).save(source / "square.png")
    lines = [{"file_name": "sub/wide.jpg", "text": "wide ünïcode"}, {"file_name": "square.png", "text": "square"}]
    (source / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["prepare", str(source), str(out), *BUCKETS, "--image-format", "keep"]) == 0
    assert {(row["file_name"], row["text"]) for row in _rows(out)} == {
        ("sub/wide.jpg", "wide ünïcode"),
        ("square.png", "square"),
    }
    with Image.open(out / "sub" / "wide.jpg") as image:
        assert image.format == "JPEG" and image.size == (64, 32)
    records, skipped = discover(out)
    assert [(r.path.name, r.caption, r.width, r.height) for r in records] == [
        ("square.png", "square", 32, 32),
        ("wide.jpg", "wide ünïcode", 64, 32),
    ]
    assert skipped == []


def test_alignment_from_family_and_model(tmp_path: Path) -> None:
    source = make_dataset(tmp_path / "in", sizes=((96, 64), (64, 64)), colours=("red",))
    sd3 = facts_class("sd3").alignment
    assert main(["prepare", str(source), str(tmp_path / "a"), "--resolution", "100", "--family", "sd3"]) == 0
    for row in _rows(tmp_path / "a"):
        with Image.open(tmp_path / "a" / row["file_name"]) as image:
            assert image.width % sd3 == 0 and image.height % sd3 == 0 and min(image.size) == 128

    model = tmp_path / "model"
    model.mkdir()
    ltx = facts_class("ltx-video")
    (model / "model_index.json").write_text(json.dumps({"_class_name": ltx.pipeline_class}))
    out = tmp_path / "b"
    assert (
        main(["prepare", str(source), str(out), "--resolution", "40", "--bucket-step", "32", "--model", str(model)])
        == 0
    )
    sizes = {Image.open(out / row["file_name"]).size for row in _rows(out)}
    expected = {assign_bucket(w, h, bucket_sizes(40, "pixel", ltx.alignment, 32, 2.0)) for w, h in ((96, 64), (64, 64))}
    assert sizes == expected and all(side % ltx.alignment == 0 for size in sizes for side in size)


def test_user_errors_exit_2_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = make_dataset(tmp_path / "in", sizes=((64, 64),), colours=("red",))
    missing = tmp_path / "nope"
    assert main(["prepare", str(missing), str(tmp_path / "out"), *BUCKETS]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and str(missing) in error and "does not exist" in error
    assert not (tmp_path / "out").exists()

    assert main(["prepare", str(source), str(tmp_path / "out"), "--resolution", "32", "--bucket-step", "24"]) == 2
    assert "--bucket-step" in capsys.readouterr().err
    assert main(["prepare", str(source), str(source / "out"), *BUCKETS]) == 2
    assert "separate folders" in capsys.readouterr().err

    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("not ours")
    assert main(["prepare", str(source), str(other), *BUCKETS, "--overwrite"]) == 2
    assert "not written by `dittune prepare`" in capsys.readouterr().err
    assert (other / "keep.txt").exists()

    out = tmp_path / "out"
    assert main(["prepare", str(source), str(out), *BUCKETS]) == 0
    (out / "stale.png").write_bytes(b"")
    assert main(["prepare", str(source), str(out), *BUCKETS]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["prepare", str(source), str(out), *BUCKETS, "--overwrite"]) == 0
    assert not (out / "stale.png").exists() and [row["file_name"] for row in _rows(out)] == ["red_0.png"]


# ---------------------------------------------------------------------------------------- ControlNet data
def _noise(width: int, height: int, seed: int) -> Image.Image:
    """Random pixels: a wrong crop, resize or pairing changes them."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _placed(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1.0


def _control_source(root: Path) -> Path:
    """wide: its inverse as control; tall: a larger control of another aspect; c.png and c.jpg share c_control.png
    (so their outputs' control names would clash); lone: no control image."""
    root.mkdir(parents=True)
    wide = _noise(96, 64, 1)
    images = {"wide.png": wide, "tall.png": _noise(40, 72, 2), "c.png": _noise(48, 48, 3), "c.jpg": _noise(64, 48, 4)}
    controls = {"wide": Image.fromarray(255 - np.asarray(wide)), "tall": _noise(120, 90, 12), "c": _noise(50, 50, 13)}
    for name, image in {**images, "lone.png": _noise(32, 32, 5)}.items():
        image.save(root / name, quality=95)
        (root / name).with_suffix(".txt").write_text(f"caption of {name}")
    for stem, image in controls.items():
        image.save(root / f"{stem}_control.png")
    return root


def _plan_control(root: Path) -> DatasetPlan:
    """`root` planned as a ControlNet run plans it at `BUCKETS` with a random crop (seed 3)."""
    return _plan(root, control=True, crop="random", crop_seed=3)


def test_control_images_are_written_placed_like_their_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = _control_source(tmp_path / "in")
    out = tmp_path / "out"
    args = [*BUCKETS, "--crop", "random", "--crop-seed", "3", "--image-format", "keep", "--control"]
    assert main(["prepare", str(source), str(out), *args]) == 0
    report = capsys.readouterr().out
    assert "Prepared 4 image(s), each with its control image (4)" in report and 'method = "controlnet"' in report
    assert "lone.png: no control image lone_control.<image suffix> next to it" in report

    planned = {sample.key: sample for sample in _plan_control(source).samples}
    assert any(sample.placement.crop_left_top != (0, 0) for sample in planned.values())  # the crop matters
    rows = {row["source"]: row for row in _rows(out)}
    assert {key: (row["file_name"], row["control"]) for key, row in rows.items()} == {
        "c.jpg": ("c.jpg", "c_control.png"),
        "c.png": ("c-2.png", "c-2_control.png"),  # c_control.png is taken: the next free stem for both
        "tall.png": ("tall.png", "tall_control.png"),
        "wide.png": ("wide.png", "wide_control.png"),
    }
    for key, row in rows.items():
        sample = planned[key]
        with Image.open(out / row["control"]) as image:
            assert image.format == "PNG" and image.size == sample.placement.bucket
        # The pixels training on IN would encode for the control: its image's resize and crop (stretched if needed).
        assert torch.equal(_placed(out / row["control"]), load_pixels(sample.record.control, sample.placement, False))
    wide = rows["wide.png"]
    # The inverse of the image, placed, is the inverse of the placed image (to Lanczos' rounding).
    assert torch.allclose(_placed(out / wide["control"]), -_placed(out / wide["file_name"]), atol=1.01 / 127.5)

    # A ControlNet run on OUT pairs every image, plans the same buckets and reads the same control pixels.
    by_file = {row["file_name"]: planned[key] for key, row in rows.items()}
    records, skipped = discover(out, control=True)
    assert skipped == []
    assert {r.path.relative_to(out).as_posix(): r.control.relative_to(out).as_posix() for r in records} == {
        row["file_name"]: row["control"] for row in rows.values()
    }
    again = _plan_control(out).samples
    assert len(again) == 4
    for sample in again:
        before = by_file[sample.key]
        assert sample.placement.bucket == sample.placement.resized == before.placement.bucket
        assert sample.placement.crop_left_top == (0, 0)
        placed = load_pixels(sample.record.control, sample.placement, False)
        assert torch.equal(placed, load_pixels(before.record.control, before.placement, False))
    # Other methods train on OUT as before: the control images are not samples.
    assert sorted(r.path.name for r in discover(out)[0]) == ["c-2.png", "c.jpg", "tall.png", "wide.png"]


def test_control_files_without_control_flag_get_a_note(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = _control_source(tmp_path / "in")
    assert main(["prepare", str(source), str(tmp_path / "out"), *BUCKETS]) == 0
    report = capsys.readouterr().out
    assert "3 file(s) named *_control.* (e.g. c_control.png) look like ControlNet control images" in report
    assert "add --control to pair each with its image" in report
    assert all("control" not in row for row in _rows(tmp_path / "out"))

    plain = make_dataset(tmp_path / "plain", sizes=((64, 64),), colours=("red",))
    assert main(["prepare", str(plain), str(tmp_path / "out2"), *BUCKETS]) == 0
    assert "--control" not in capsys.readouterr().out
    assert main(["prepare", str(source), str(tmp_path / "out3"), *BUCKETS, "--control", "--frames", "4"]) == 2
    assert "--control" in capsys.readouterr().err and not (tmp_path / "out3").exists()
