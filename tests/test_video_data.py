"""Video data without a model: probing, bad inputs, frame choice, plans and reports, clip loading, writing
clips, the resume fingerprint over frames, and the cache geometry of clips."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_clip
from dittune.data.discover import discover
from dittune.data.report import ClipOptions, format_bucket_report, plan_dataset
from dittune.data.sampler import BucketBatchSampler
from dittune.data.transforms import pixels_from_image
from dittune.data.video import decode_frames, load_sample, probe_video, select_frames
from dittune.media import strip, write_frames
from dittune.models.facts import STILL, FrameRule
from dittune.train.prepare import latent_geometry

PLAN = {
    "resolution": 64,
    "resolution_type": "pixel",
    "alignment": 16,
    "step": 64,
    "max_aspect_ratio": 2.0,
    "crop": "center",
    "crop_seed": 0,
    "batch_size": 1,
    "incomplete_batches": "keep",
}


def _vfr_clip(path: Path, gaps_ms: list[int]) -> Path:
    """A clip whose frame intervals are `gaps_ms` (a variable frame rate)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        time = 0
        for index, gap in enumerate([*gaps_ms, 0]):
            frame = av.VideoFrame.from_image(Image.new("RGB", (64, 64), (index * 20, 0, 0)))
            frame.pts, frame.time_base = time, Fraction(1, 1000)
            time += gap
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        for index in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = 8000, index * 800
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    good = make_clip(tmp_path / "good.mp4", 9)
    data = good.read_bytes()
    files = {
        "zero": tmp_path / "zero.mp4",
        "truncated": tmp_path / "truncated.mp4",
        "codec": tmp_path / "codec.mp4",
        "audio": _audio_only(tmp_path / "audio.mkv"),
    }
    files["zero"].write_bytes(b"")
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["codec"].write_bytes(data.replace(b"avc1", b"zzzz").replace(b"avcC", b"zzzC"))
    return files


def test_probe_names_every_bad_input(bad_inputs: dict[str, Path]) -> None:
    reasons = {name: probe_video(path) for name, path in bad_inputs.items()}
    assert all(isinstance(reason, str) for reason in reasons.values()), reasons
    assert reasons["zero"] == "empty file (0 bytes)"
    assert "truncated" in reasons["truncated"]
    assert "undecodable codec" in reasons["codec"]
    assert reasons["audio"] == "no video stream (only audio streams)"


def test_probe_reads_size_frames_and_rate(tmp_path: Path) -> None:
    info = probe_video(make_clip(tmp_path / "a.mp4", 9, fps=8.0, size=(96, 64)))
    assert (info.width, info.height, info.frames, info.fps, info.variable_rate) == (96, 64, 9, 8.0, False)
    assert info.times == pytest.approx([i / 8 for i in range(9)])


def test_variable_frame_rate_is_detected_and_frames_are_chosen_by_time(tmp_path: Path) -> None:
    info = probe_video(_vfr_clip(tmp_path / "vfr.mp4", [100, 33] * 5))
    assert info.variable_rate and info.frames == 11
    indices, rate = select_frames(info, 5, 10.0, "start")
    # targets 0, .1, .2, .3, .4 s; frames shown at 0, .1, .133, .233, .266, .366, .4 ...
    assert indices == (0, 1, 2, 4, 6) and rate == 10.0


def test_frame_sampling_modes_and_fps_resampling(tmp_path: Path) -> None:
    info = probe_video(make_clip(tmp_path / "a.mp4", 9, fps=8.0))
    assert select_frames(info, 5, None, "start") == ((0, 1, 2, 3, 4), 8.0)
    assert select_frames(info, 5, None, "middle") == ((2, 3, 4, 5, 6), 8.0)
    assert select_frames(info, 5, None, "uniform") == ((0, 2, 4, 6, 8), 4.0)
    assert select_frames(info, 5, 4.0, "start") == ((0, 2, 4, 6, 8), 4.0)
    assert select_frames(info, 3, 16.0, "start")[0] == (0, 0, 1)  # upsampling repeats frames
    with pytest.raises(ValueError, match="cannot give a clip of 9"):
        select_frames(info, 9, 4.0, "start")


def test_discover_lists_clips_stills_and_every_bad_input(tmp_path: Path, bad_inputs: dict[str, Path]) -> None:
    root = tmp_path
    for path in bad_inputs.values():
        path.with_suffix(".txt").write_text("a caption")
    (root / "good.txt").write_bytes("\ufeffa red ball".encode("utf-8"))  # BOM: read as plain UTF-8
    Image.new("RGB", (64, 64), "blue").save(root / "still.png")
    (root / "still.txt").write_text("a blue square")
    make_clip(root / "latin.mp4", 9)
    (root / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    records, skipped = discover(root, video=True)
    assert [(r.path.name, r.caption, r.frames) for r in records] == [
        ("good.mp4", "a red ball", 9),
        ("still.png", "a blue square", 1),
    ]
    assert records[0].is_video and not records[1].is_video
    reasons = {s.path.name: s.reason for s in skipped}
    assert set(reasons) == {"zero.mp4", "truncated.mp4", "codec.mp4", "audio.mkv", "latin.mp4"}
    assert "not UTF-8" in reasons["latin.mp4"] and "0xe9" in reasons["latin.mp4"]
    # an image family lists videos as skipped, never silently
    records, skipped = discover(root, video=False)
    assert [r.path.name for r in records] == ["still.png"]
    assert {s.path.name: s.reason for s in skipped}["good.mp4"].startswith("a video file")


def test_plan_snaps_frames_skips_short_clips_and_reports_it(tmp_path: Path) -> None:
    make_clip(tmp_path / "long.mp4", 17)
    make_clip(tmp_path / "short.mp4", 6)
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "still.png")
    for name in ("long", "short", "still"):
        (tmp_path / f"{name}.txt").write_text(name)
    records, skipped = discover(tmp_path, video=True)
    clips = ClipOptions(FrameRule(4), frames=10)
    plan = plan_dataset(records, tmp_path, skipped=skipped, clips=clips, **PLAN)
    assert {b: [plan.samples[i].key for i in idx] for b, idx in plan.buckets.items()} == {
        (64, 64, 1): ["still.png"],
        (64, 64, 9): ["long.mp4"],
    }
    (short,) = plan.skipped
    assert "clip has 6 frames at 8 fps" in short.reason and "needs 9 (data.frames)" in short.reason
    report = format_bucket_report(plan, batch_size=1)
    assert "bucket w×h×frames" in report and "64×64×9f" in report and "64×64×1f" in report
    assert "data.frames = 10 snapped down to 9 (this family takes 4k+1 frames)" in report
    assert "short.mp4: clip has 6 frames" in report

    shortened = plan_dataset(
        records, tmp_path, skipped=skipped, clips=ClipOptions(FrameRule(4), 9, short_clips="shorten"), **PLAN
    )
    assert sorted(shortened.buckets) == [(64, 64, 1), (64, 64, 5), (64, 64, 9)]
    assert "trained at 5 frames" in format_bucket_report(shortened, batch_size=1)


def test_an_image_family_plan_has_one_frame_buckets(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "still.png")
    (tmp_path / "still.txt").write_text("x")
    records, skipped = discover(tmp_path)
    plan = plan_dataset(records, tmp_path, skipped=skipped, clips=ClipOptions(STILL), **PLAN)
    assert list(plan.buckets) == [(64, 64, 1)]
    assert "64×64  " in format_bucket_report(plan, batch_size=1)  # image reports keep the w×h label


def test_load_sample_decodes_the_chosen_frames(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "a.mp4", 9, size=(96, 64))
    (tmp_path / "a.txt").write_text("x")
    records, _ = discover(tmp_path, video=True)
    plan = plan_dataset(records, tmp_path, clips=ClipOptions(FrameRule(4), 5, fps=4.0), **PLAN)
    placement = plan.samples[0].placement
    assert placement.frame_indices == (0, 2, 4, 6, 8) and placement.shape == (128, 64, 5)
    clip = load_sample(path, placement, flip=True)
    assert clip.shape == (3, 5, 64, 128) and clip.dtype == torch.float32
    frames = decode_frames(path, placement.frame_indices)
    torch.testing.assert_close(clip[:, 3], pixels_from_image(frames[3], placement, True))
    assert not torch.equal(clip[:, 0], clip[:, 4])  # the disc moves


def test_written_clips_round_trip(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (32, 16), (40 * i, 255 - 40 * i, 0)) for i in range(5)]
    png = write_frames(frames, tmp_path / "clip.png", 8)
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(strip(frames)))
    assert Image.open(png).size == (5 * 32, 16)
    info = probe_video(write_frames(frames, tmp_path / "clip.mp4", 8))
    assert (info.frames, info.fps, info.width, info.height) == (5, 8.0, 32, 16)
    for suffix in (".gif", ".webp"):
        with Image.open(write_frames(frames, tmp_path / f"clip{suffix}", 8)) as written:
            assert written.n_frames == 5
    with pytest.raises(ValueError, match="unknown output format"):
        write_frames(frames, tmp_path / "clip.avi", 8)


def test_the_resume_fingerprint_covers_the_frame_dimension() -> None:
    one = BucketBatchSampler({(64, 64, 9): [0, 1]}, batch_size=1, seed=0)
    other = BucketBatchSampler({(64, 64, 5): [0, 1]}, batch_size=1, seed=0)
    assert one.fingerprint != other.fingerprint
    with pytest.raises(ValueError, match="bucket layout changed"):
        other.load_state_dict(one.state_dict())


def test_clip_geometry_changes_exactly_with_the_chosen_frames(tmp_path: Path) -> None:
    make_clip(tmp_path / "nine.mp4", 9)
    make_clip(tmp_path / "seventeen.mp4", 17)
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "still.png")
    for name in ("nine", "seventeen", "still"):
        (tmp_path / f"{name}.txt").write_text(name)
    records, _ = discover(tmp_path, video=True)

    def geometries(**options) -> dict[str, dict]:
        plan = plan_dataset(records, tmp_path, clips=ClipOptions(FrameRule(4), **options), **PLAN)
        return {s.key: latent_geometry(s.placement, False) for s in plan.samples}

    base = geometries(frames=9)
    assert set(base["still.png"]) == {"bucket", "resized", "crop_left_top", "flip", "resize"}  # as before clips
    assert base["nine.mp4"]["frames"] == list(range(9)) and base["nine.mp4"]["fps"] == 8.0

    def changed(other: dict[str, dict]) -> set[str]:
        return {key for key in base if base[key] != other[key]}

    assert changed(geometries(frames=5)) == {"nine.mp4", "seventeen.mp4"}
    assert changed(geometries(frames=9, sampling="middle")) == {"seventeen.mp4"}  # nine has no room to move
    assert changed(geometries(frames=9, fps=8.0)) == set()  # the source rate already
    assert changed(geometries(frames=5, fps=4.0)) == {"nine.mp4", "seventeen.mp4"}


def test_metadata_files_list_clips_and_stills(tmp_path: Path) -> None:
    make_clip(tmp_path / "clips" / "a.mp4", 9)
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "still.png")
    rows = [{"file_name": "clips/a.mp4", "text": "a ball"}, {"file_name": "still.png", "text": "a square"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    records, _ = discover(tmp_path, video=True)
    assert [(r.path.name, r.caption, r.frames) for r in records] == [
        ("a.mp4", "a ball", 9),
        ("still.png", "a square", 1),
    ]
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text\nclips/a.mp4,a ball\n")
    records, _ = discover(tmp_path, video=True)
    assert [(r.path.name, r.fps) for r in records] == [("a.mp4", 8.0)]
