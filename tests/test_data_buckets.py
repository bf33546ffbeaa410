"""Bucket maths (sizes, assignment, placement), dataset planning and the bucket report."""

from __future__ import annotations

from pathlib import Path

import pytest

from dittune.data.buckets import MEGAPIXEL, assign_bucket, bucket_sizes, place, snap, square_bucket
from dittune.data.discover import DataError
from dittune.data.report import format_bucket_report, plan_dataset, remove_samples
from dittune.data.types import ImageRecord, Skipped

ALIGN = 16


def test_snap_rounds_half_up_and_never_returns_zero() -> None:
    assert snap(724.08, 16) == 720
    assert snap(24, 16) == 32
    assert snap(23.9, 16) == 16
    assert snap(0.001, 16) == 16


def test_pixel_buckets_keep_the_short_edge() -> None:
    sizes = bucket_sizes(512, "pixel", ALIGN, 64, 2.0)
    assert {(512, 512), (1024, 512), (512, 1024)} <= set(sizes)
    assert all(min(size) == 512 for size in sizes)
    assert all(max(size) / min(size) <= 2.0 for size in sizes)
    assert (1088, 512) not in sizes
    assert sizes == sorted(set(sizes))
    assert len(sizes) == 1 + 2 * 8  # long edges 576, 640, ..., 1024


@pytest.mark.parametrize(("area", "side"), [(0.5, 720), (0.25, 512), (1.0, 1024)])
def test_area_square_bucket(area: float, side: int) -> None:
    assert square_bucket(area, "area", ALIGN) == (side, side)


def test_area_buckets_stay_near_the_requested_area() -> None:
    sizes = bucket_sizes(0.5, "area", ALIGN, 64, 2.0)
    target = 0.5 * MEGAPIXEL
    assert (720, 720) in sizes
    assert len(sizes) > 3
    for width, height in sizes:
        assert width % ALIGN == 0 and height % ALIGN == 0
        assert abs(width * height / target - 1) <= 0.06
        assert max(width, height) / min(width, height) <= 2.0
        assert (height, width) in sizes


def test_tiny_area_never_truncates_to_zero() -> None:
    assert square_bucket(0.0001, "area", ALIGN) == (16, 16)
    sizes = bucket_sizes(0.01, "area", ALIGN, 16, 4.0)
    assert all(width >= ALIGN and height >= ALIGN for width, height in sizes)


def test_max_aspect_ratio_one_gives_only_the_square() -> None:
    assert bucket_sizes(512, "pixel", ALIGN, 64, 1.0) == [(512, 512)]


def test_invalid_step_names_the_option_and_a_fix() -> None:
    with pytest.raises(ValueError, match=r"data\.bucket_step = 40.*alignment 16.*use 48"):
        bucket_sizes(512, "pixel", ALIGN, 40, 2.0)


def test_unknown_resolution_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="resolution_type"):
        square_bucket(512, "pixels", ALIGN)


def test_assign_bucket_matches_the_aspect_ratio() -> None:
    sizes = bucket_sizes(512, "pixel", ALIGN, 64, 2.0)
    assert assign_bucket(1500, 1000, sizes) == (768, 512)
    assert assign_bucket(1000, 1500, sizes) == (512, 768)
    assert assign_bucket(800, 800, sizes) == (512, 512)
    assert assign_bucket(5000, 1000, sizes) == (1024, 512)
    assert assign_bucket(1000, 5000, sizes) == (512, 1024)


def test_assign_bucket_tie_prefers_the_larger_area() -> None:
    assert assign_bucket(100, 100, [(64, 64), (128, 128)]) == (128, 128)
    # A 2:1 image is exactly as far (in log space) from 4:1 as from 1:1.
    assert assign_bucket(200, 100, [(16, 16), (64, 16)]) == (64, 16)
    assert assign_bucket(200, 100, [(32, 8), (32, 32)]) == (32, 32)


@pytest.mark.parametrize("crop", ["center", "random"])
@pytest.mark.parametrize(("width", "height"), [(1500, 1000), (1000, 1500), (700, 700), (5000, 1000), (300, 200)])
def test_placement_covers_the_bucket_and_crops_inside(crop: str, width: int, height: int) -> None:
    sizes = bucket_sizes(512, "pixel", ALIGN, 64, 2.0)
    bucket = assign_bucket(width, height, sizes)
    placement = place(width, height, bucket, crop, seed=3, key="a/b.png")
    resized_width, resized_height = placement.resized
    assert placement.bucket == bucket
    assert resized_width >= bucket[0] and resized_height >= bucket[1]
    assert min(resized_width - bucket[0], resized_height - bucket[1]) <= 1  # one side fits exactly
    assert abs(resized_width / resized_height - width / height) < 0.01 * width / height
    left, top = placement.crop_left_top
    assert 0 <= left <= resized_width - bucket[0]
    assert 0 <= top <= resized_height - bucket[1]


def test_center_crop_is_centred() -> None:
    placement = place(2000, 1000, (512, 512), "center", seed=0, key="x")
    assert placement.resized == (1024, 512)
    assert placement.crop_left_top == (256, 0)


def test_random_crop_is_stable_per_seed_and_key() -> None:
    first = place(3000, 1000, (512, 512), "random", seed=7, key="cats/1.png")
    again = place(3000, 1000, (512, 512), "random", seed=7, key="cats/1.png")
    assert first == again
    lefts = {place(3000, 1000, (512, 512), "random", seed=seed, key="cats/1.png").crop_left_top for seed in range(8)}
    assert len(lefts) > 1
    assert all(top == 0 for _, top in lefts)
    other_key = {place(3000, 1000, (512, 512), "random", seed=7, key=f"cats/{i}.png").crop_left_top for i in range(8)}
    assert len(other_key) > 1


def test_unknown_crop_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="crop"):
        place(100, 100, (64, 64), "middle", seed=0, key="x")


# Dataset planning and the bucket report ------------------------------------------------------------

ROOT = Path("/data/set")
PLAN_OPTIONS = {
    "resolution": 512,
    "resolution_type": "pixel",
    "alignment": ALIGN,
    "step": 64,
    "max_aspect_ratio": 2.0,
    "crop": "center",
    "crop_seed": 0,
}


def records(*sizes_by_name: tuple[str, int, int]) -> list[ImageRecord]:
    return [ImageRecord(ROOT / name, f"caption {name}", width, height) for name, width, height in sizes_by_name]


def mixed_records() -> list[ImageRecord]:
    squares = [(f"sq/{i}.png", 800, 800) for i in range(5)]
    wides = [(f"wide/{i}.png", 1500, 1000) for i in range(2)]
    return records(*squares, *wides, ("tall.png", 1000, 1500))


def test_plan_groups_samples_by_bucket_with_keys() -> None:
    plan = plan_dataset(reversed(mixed_records()), ROOT, batch_size=2, incomplete_batches="keep", **PLAN_OPTIONS)
    assert [sample.key for sample in plan.samples][:2] == ["sq/0.png", "sq/1.png"]
    assert {bucket: len(indices) for bucket, indices in plan.buckets.items()} == {
        (512, 512, 1): 5,
        (512, 768, 1): 1,
        (768, 512, 1): 2,
    }
    for bucket, indices in plan.buckets.items():
        assert all(plan.samples[index].placement.shape == bucket for index in indices)
    assert plan.dropped_for_batch == {}


def test_plan_counts_drops_and_the_report_shows_them() -> None:
    skipped = [Skipped(ROOT / "broken.png", "cannot identify image file")]
    plan = plan_dataset(mixed_records(), ROOT, batch_size=2, incomplete_batches="drop", skipped=skipped, **PLAN_OPTIONS)
    assert plan.dropped_for_batch == {(512, 512, 1): 1, (512, 768, 1): 1}

    report = format_bucket_report(plan, batch_size=2)
    lines = report.splitlines()
    assert any(line.split()[:4] == ["512×512", "1.00:1", "5", "2"] and "1 dropped" in line for line in lines)
    assert any(line.split()[:4] == ["768×512", "1.50:1", "2", "1"] and "full" in line for line in lines)
    assert any(line.split()[:4] == ["512×768", "1:1.50", "1", "0"] and "1 dropped" in line for line in lines)
    assert "2 dropped" in report
    assert "Skipped 1 file:" in report
    assert f"{ROOT / 'broken.png'}: cannot identify image file" in report
    assert "1 bucket smaller than batch_size 2" in report


def test_report_shows_partial_batches_when_kept() -> None:
    plan = plan_dataset(mixed_records(), ROOT, batch_size=4, incomplete_batches="keep", **PLAN_OPTIONS)
    report = format_bucket_report(plan, batch_size=4, gradient_accumulation_steps=2)
    assert "partial (1)" in report
    assert "dropped" not in report
    assert "2 buckets smaller than batch_size 4 → partial batches" in report
    assert "8 samples in 4 batches = 2 optimizer steps" in report


def test_report_lists_at_most_fifty_skipped_files() -> None:
    skipped = [Skipped(ROOT / f"bad{i:03}.png", "corrupt") for i in range(60)]
    plan = plan_dataset(mixed_records(), ROOT, batch_size=1, incomplete_batches="keep", skipped=skipped, **PLAN_OPTIONS)
    report = format_bucket_report(plan, batch_size=1)
    assert "Skipped 60 files:" in report
    assert "bad049.png: corrupt" in report and "bad050.png" not in report
    assert "... and 10 more" in report


def test_plan_with_no_full_batch_explains_the_fix() -> None:
    with pytest.raises(DataError, match=r'batch_size 8.*512×512: 5.*incomplete_batches = "keep"'):
        plan_dataset(mixed_records(), ROOT, batch_size=8, incomplete_batches="drop", **PLAN_OPTIONS)


def test_remove_samples_moves_them_to_skipped_and_reindexes() -> None:
    plan = plan_dataset(mixed_records(), ROOT, batch_size=2, incomplete_batches="drop", **PLAN_OPTIONS)
    smaller = remove_samples(plan, {"sq/1.png", "tall.png"}, {"sq/1.png": "image file is truncated"})
    assert [sample.key for sample in smaller.samples] == [
        "sq/0.png",
        "sq/2.png",
        "sq/3.png",
        "sq/4.png",
        "wide/0.png",
        "wide/1.png",
    ]
    assert smaller.buckets == {(512, 512, 1): [0, 1, 2, 3], (768, 512, 1): [4, 5]}
    assert smaller.dropped_for_batch == {}
    assert {(entry.path.name, entry.reason) for entry in smaller.skipped} == {
        ("1.png", "image file is truncated"),
        ("tall.png", "failed to decode"),
    }
    assert len(plan.samples) == 8  # the original plan is untouched
