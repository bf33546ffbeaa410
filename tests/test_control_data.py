"""ControlNet data: control images are found next to their images or in metadata, placed with exactly their
image's bucket, crop and flip, cached like latents under keys that include that geometry, and collated into
`TrainBatch.control` in item order.

The cache tests drive the real `prepare_data` with the tiny v1.2 Hunyuan-DiT (its VAE encodes 64-pixel images
in milliseconds) on noise images, so a wrong crop, flip or pairing changes the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dittune.cache.build import LATENT
from dittune.cache.store import CacheStore
from dittune.config.load import validate_config
from dittune.config.schema import DittuneConfig
from dittune.data.discover import STILLS_ONLY_REASON, discover
from dittune.data.transforms import load_pixels
from dittune.models.hunyuan_dit.spec import HunyuanDiTSpec
from dittune.train.batches import CachedBatches
from dittune.train.prepare import PreparedData, bucket_report, plan_data, prepare_data

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def noise(width: int, height: int, seed: int) -> Image.Image:
    """Random RGB pixels: no symmetry, so a wrong crop offset or a missing flip shows."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def inverted(image: Image.Image) -> Image.Image:
    return Image.fromarray(255 - np.asarray(image))


def add_sample(
    root: Path, stem: str, size: tuple[int, int], seed: int, control: Image.Image | None = None
) -> Image.Image:
    """`stem.png` (noise) with its caption and, unless `control` is None, `stem_control.png`."""
    (root / stem).parent.mkdir(parents=True, exist_ok=True)
    image = noise(*size, seed)
    image.save(root / f"{stem}.png")
    (root / f"{stem}.txt").write_text(f"sample {stem}")
    if control is not None:
        control.save(root / f"{stem}_control.png")
    return image


def control_dataset(root: Path) -> Path:
    """a: a wide image with its inverse as control; b: a tall image whose control is larger, of another aspect
    and unrelated; c: square, control = the image itself (identical pixels, still a separate entry)."""
    a = noise(96, 64, 1)
    add_sample(root, "a", (96, 64), 1, inverted(a))
    add_sample(root, "b", (48, 80), 2, noise(120, 160, 12))
    c = add_sample(root, "c", (64, 64), 3)
    c.save(root / "c_control.png")
    return root


# --- discovery -------------------------------------------------------------------------------------------


def test_folder_pairs_control_siblings_and_skips_what_lacks_one(tmp_path: Path) -> None:
    add_sample(tmp_path, "a", (32, 32), 1, noise(64, 32, 11))
    add_sample(tmp_path, "b", (32, 48), 2)
    noise(16, 16, 12).save(tmp_path / "b_control.webp")
    add_sample(tmp_path, "nested/c", (32, 32), 3)  # no control image
    add_sample(tmp_path, "d", (32, 32), 4)
    (tmp_path / "d_control.png").write_bytes(b"not an image")
    noise(16, 16, 5).save(tmp_path / "orphan_control.png")

    records, skipped = discover(tmp_path, control=True)

    assert [(r.path.name, r.control.name if r.control else None) for r in records] == [
        ("a.png", "a_control.png"),
        ("b.png", "b_control.webp"),
    ]
    assert [r.control_size for r in records] == [(64, 32), (16, 16)]
    reasons = {s.path.relative_to(tmp_path).as_posix(): s.reason for s in skipped}
    assert reasons["nested/c.png"] == "no control image c_control.<image suffix> next to it"
    assert reasons["d.png"].startswith("control image d_control.png: cannot identify image file")
    assert "without its image (orphan.<suffix>" in reasons["orphan_control.png"]

    # Without control nothing changes: control files are ordinary (uncaptioned) images, records have no control.
    plain, plain_skipped = discover(tmp_path)
    assert [r.path.name for r in plain] == ["a.png", "b.png", "d.png", "c.png"]
    assert all(r.control is None and r.control_size is None for r in plain)
    assert {s.path.name for s in plain_skipped} == {
        "a_control.png",
        "b_control.webp",
        "d_control.png",
        "orphan_control.png",
    }


def test_metadata_control_column_with_sibling_fallback(tmp_path: Path) -> None:
    add_sample(tmp_path, "a", (32, 32), 1)
    (tmp_path / "edges").mkdir()
    noise(40, 40, 11).save(tmp_path / "edges" / "a.png")
    add_sample(tmp_path, "b", (32, 32), 2, noise(32, 32, 12))  # no column value: the sibling file
    add_sample(tmp_path, "c", (32, 32), 3)
    add_sample(tmp_path, "d", (32, 32), 4)
    rows = [
        {"file_name": "a.png", "text": "a", "control": "edges/a.png"},
        {"file_name": "b.png", "text": "b"},
        {"file_name": "c.png", "text": "c", "control": "edges/missing.png"},
        {"file_name": "d.png", "text": "d"},
        {"file_name": "b_control.png", "text": "a control image listed as a sample"},
    ]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    records, skipped = discover(tmp_path, control=True)

    assert {r.path.name: r.control for r in records} == {
        "a.png": tmp_path / "edges" / "a.png",
        "b.png": tmp_path / "b_control.png",
    }
    reasons = {s.path.name: s.reason for s in skipped}
    assert reasons == {
        "c.png": "control image edges/missing.png listed in metadata.jsonl line 3 is missing",
        "d.png": "no control image: no 'control' value in metadata.jsonl line 4, "
        "and no d_control.<image suffix> next to it",
        "b_control.png": "named like a control image (*_control.*), so not a training sample",
    }

    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text,control\na.png,a,edges/a.png\nc.png,c,\n")
    records, skipped = discover(tmp_path, control=True)
    assert [(r.path.name, r.control) for r in records] == [("a.png", tmp_path / "edges" / "a.png")]
    assert [s.reason for s in skipped] == [
        "no control image: no 'control' value in metadata.csv line 3, and no c_control.<image suffix> next to it"
    ]


def test_clips_are_refused_for_controlnet(tmp_path: Path) -> None:
    add_sample(tmp_path, "a", (32, 32), 1, noise(32, 32, 11))
    (tmp_path / "clip.mp4").write_bytes(b"never probed")
    (tmp_path / "clip.txt").write_text("a clip")
    noise(32, 32, 12).save(tmp_path / "clip_control.png")
    records, skipped = discover(tmp_path, video=True, control=True)
    assert [r.path.name for r in records] == ["a.png"]
    assert [(s.path.name, s.reason) for s in skipped] == [("clip.mp4", STILLS_ONLY_REASON)]


# --- placement -------------------------------------------------------------------------------------------


def config(model: Path, data: Path, cache: Path, method: str = "controlnet", **data_options: Any) -> DittuneConfig:
    """A config for the tiny model at 48 pixels; `data_options` go into [data]."""
    return validate_config(
        {
            "output_dir": str(data.parent / "out"),
            "model": {"family": "hunyuan-dit", "path": str(model)},
            "data": {"path": str(data), "resolution": 48, "resolution_type": "pixel", **data_options},
            "train": {"max_steps": 1, "method": method},
            "cache": {"dir": str(cache)},
        }
    )


@pytest.fixture(scope="module")
def model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["v1.2"]


def expected_placed(
    path: Path, resized: tuple[int, int], crop: tuple[int, int], size: tuple[int, int], flip: bool
) -> torch.Tensor:
    """Resize to `resized`, crop `size` at `crop`, mirror: computed here with PIL and numpy."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB").resize(resized, Image.Resampling.LANCZOS), dtype=np.float32)
    (left, top), (width, height) = crop, size
    array = array[top : top + height, left : left + width]
    if flip:
        array = array[:, ::-1]
    return torch.from_numpy(array.copy()).permute(2, 0, 1) / 127.5 - 1.0


def test_control_is_placed_with_its_images_bucket_crop_and_flip(tmp_path: Path, model: Path) -> None:
    data = control_dataset(tmp_path / "data")
    plan = plan_data(config(model, data, tmp_path / "cache", crop="random", crop_seed=3), HunyuanDiTSpec(model))
    by_key = {s.key: s for s in plan.samples}
    assert {key: s.record.control.name for key, s in by_key.items() if s.record.control} == {
        "a.png": "a_control.png",
        "b.png": "b_control.png",
        "c.png": "c_control.png",
    }
    assert any(s.placement.crop_left_top != (0, 0) for s in plan.samples)  # the crop matters here
    for sample in plan.samples:
        placement, control = sample.placement, sample.record.control
        for flip in (False, True):
            placed = load_pixels(control, placement, flip)
            expected = expected_placed(control, placement.resized, placement.crop_left_top, placement.bucket, flip)
            assert torch.equal(placed, expected)
    a = by_key["a.png"]
    for flip in (False, True):  # the inverse of the image, placed, is the inverse of the placed image
        target = load_pixels(a.record.path, a.placement, flip)
        control = load_pixels(a.record.control, a.placement, flip)
        assert torch.allclose(control, -target, atol=1.01 / 127.5)
        assert not torch.allclose(control, -load_pixels(a.record.path, a.placement, not flip), atol=0.1)

    report = bucket_report(config(model, data, tmp_path / "cache"), plan)
    assert "Control images: 3, each resized, cropped and flipped exactly like its image." in report
    assert "b.png: control image 120×160 stretched to the image's aspect (48×80)" in report
    assert "a.png: control image" not in report


# --- caching and batches ---------------------------------------------------------------------------------


class Counting:
    """`get_vae` for prepare_data: builds the VAE once (as `fill_caches` does), counts the requests (one per pass
    with something to encode) and runs `before_first` at the first (e.g. to damage a file after discovery)."""

    def __init__(self, spec: HunyuanDiTSpec, before_first: Any = None) -> None:
        self.spec, self.calls, self.before_first = spec, 0, before_first
        self.vae: torch.nn.Module | None = None

    def __call__(self) -> torch.nn.Module:
        self.calls += 1
        if self.vae is None:
            if self.before_first:
                self.before_first()
            self.vae = self.spec.load_vae(CPU, torch.float32)
        return self.vae


def prepare(cfg: DittuneConfig, spec: HunyuanDiTSpec, before_first: Any = None) -> tuple[PreparedData, int]:
    """`prepare_data` on the CPU; returns it and how often it asked for the VAE."""
    vae = Counting(spec, before_first)
    prepared = prepare_data(
        cfg, spec, device=CPU, compute_dtype="fp32", get_vae=vae, progress=False, announce=lambda _: None
    )
    return prepared, vae.calls


def test_control_latents_cached_under_the_targets_geometry(tmp_path: Path, model: Path) -> None:
    spec = HunyuanDiTSpec(model)
    data, cache = control_dataset(tmp_path / "data"), tmp_path / "cache"
    cfg = config(model, data, cache, crop="random", random_flip=True)
    first, loads = prepare(cfg, spec)
    jobs = {(key, flip) for key in ("a.png", "b.png", "c.png") for flip in (False, True)}
    assert set(first.control_keys) == set(first.latent_keys) == jobs
    assert (first.stats["control"].hits, first.stats["control"].misses) == (0, 6) and loads > 0
    assert not set(first.control_keys.values()) & set(first.latent_keys.values())  # c: same pixels, own entry
    assert len(set(first.control_keys.values())) == 6  # flips differ

    # The cached moments are the VAE's encoding of the control image placed like its target.
    vae = spec.load_vae(CPU, torch.float32)
    store = CacheStore(cache)
    for sample in first.plan.samples:
        for flip in (False, True):
            pixels = expected_placed(
                sample.record.control,
                sample.placement.resized,
                sample.placement.crop_left_top,
                sample.placement.bucket,
                flip,
            )
            (moments,) = spec.encode_pixels(vae, pixels[None, :, None])
            cached = store.load(LATENT, first.control_keys[(sample.key, flip)])
            torch.testing.assert_close(cached["mean"], moments["mean"], atol=1e-5, rtol=1e-4)

    again, loads = prepare(cfg, spec)
    assert again.control_keys == first.control_keys and loads == 0
    assert (again.stats["control"].hits, again.stats["control"].misses) == (6, 0)

    # A new target image (same size) changes its latents, not its control's; a new control file only its keys.
    add_sample(data, "a", (96, 64), 99)
    noise(120, 160, 77).save(data / "b_control.png")
    edited, _ = prepare(cfg, spec)
    changed = {job for job, key in edited.control_keys.items() if first.control_keys[job] != key}
    assert changed == {("b.png", False), ("b.png", True)}
    assert {job for job, key in edited.latent_keys.items() if first.latent_keys[job] != key} == {
        ("a.png", False),
        ("a.png", True),
    }

    # Another geometry (resolution and crop) changes every control key.
    resized, _ = prepare(config(model, data, cache, random_flip=True, resolution=32), spec)
    assert not set(resized.control_keys.values()) & set(edited.control_keys.values())

    # The same data trained as a LoRA: the same target latents, no control work or keys.
    lora, loads = prepare(config(model, data, cache, method="lora", crop="random", random_flip=True), spec)
    assert lora.control_keys == {} and "control" not in lora.stats and loads == 0
    assert lora.latent_keys == edited.latent_keys
    batches = CachedBatches(CacheStore(cache), lora, spec.text_encoders, {}, CPU)
    assert batches.collate([(0, False)], torch.Generator().manual_seed(0)).control is None


def test_collate_stacks_control_moments_in_item_order(tmp_path: Path, model: Path) -> None:
    spec = HunyuanDiTSpec(model)
    data = tmp_path / "data"
    for index in range(3):  # one bucket, three distinct control images
        add_sample(data, f"s{index}", (48, 48), index, noise(48, 48, 10 + index))
    cfg = config(model, data, tmp_path / "cache", random_flip=True)
    prepared, _ = prepare(cfg, spec)
    store = CacheStore(cfg.cache_dir)
    batches = CachedBatches(store, prepared, spec.text_encoders, {}, CPU)
    items = [(2, True), (0, False), (1, True), (0, True)]
    batch = batches.collate(items, torch.Generator().manual_seed(0))

    assert batch.control is not None and set(batch.control) == set(batch.moments)
    for name, value in batch.control.items():
        assert value.shape == batch.moments[name].shape
    for row, (index, flipped) in enumerate(items):
        key = prepared.plan.samples[index].key
        expected = store.load(LATENT, prepared.control_keys[(key, flipped)])
        assert all(torch.equal(batch.control[name][row], expected[name]) for name in expected)
        assert not torch.equal(batch.control["mean"][row], batch.moments["mean"][row])
    means = batch.control["mean"]
    assert all(not torch.equal(means[i], means[j]) for i in range(4) for j in range(i))


def test_control_that_fails_to_encode_leaves_its_sample_out(tmp_path: Path, model: Path) -> None:
    spec = HunyuanDiTSpec(model)
    data = tmp_path / "data"
    add_sample(data, "a", (48, 48), 1, noise(48, 48, 11))
    add_sample(data, "b", (48, 48), 2, noise(48, 48, 12))
    control = data / "b_control.png"
    readable = control.read_bytes()

    def truncate() -> None:  # after discovery checked it, before the control pass loads it
        control.write_bytes(readable[: len(readable) // 3])

    prepared, _ = prepare(config(model, data, tmp_path / "cache"), spec, before_first=truncate)
    assert [s.key for s in prepared.plan.samples] == ["a.png"]
    assert set(prepared.control_keys) == set(prepared.latent_keys) == {("a.png", False)}
    (skip,) = [s for s in prepared.plan.skipped if s.path.name == "b.png"]
    assert skip.reason.startswith("control image b_control.png: image is truncated or corrupt")
    assert [path.name for path, _ in prepared.stats["control"].failed] == ["b_control.png"]
