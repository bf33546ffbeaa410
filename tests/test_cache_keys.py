"""Cache keying: each key input, changed on its own, recomputes exactly the entries it affects.

Every scenario drives the real `prepare_data` with the tiny v1.2 Hunyuan-DiT and a small dataset of
square (64×64) and non-square (96×64) images; a baseline run fills the cache, then one input changes
and the hit/miss counts of both caches, and which latent keys changed, are checked.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from conftest import make_dataset
from dittune.cache.build import LATENT, TEXT
from dittune.cache.store import KEY_FIELD, CacheStore
from dittune.config.load import validate_config
from dittune.config.schema import DittuneConfig
from dittune.fingerprint import Fingerprinter, sha256_file
from dittune.models.hunyuan_dit.spec import HunyuanDiTSpec
from dittune.train.prepare import PreparedData, plan_data, prepare_data

CPU = torch.device("cpu")
SIZES = ((64, 64), (96, 64))
COLOURS = ("red", "blue")
IMAGES = len(SIZES) * len(COLOURS)


pytestmark = pytest.mark.usefixtures("one_thread")


class CountingSpec(HunyuanDiTSpec):
    """The real spec, counting how often the text encoders are loaded."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.text_loads = 0

    def load_text_encoders(self, device: torch.device, dtype: torch.dtype) -> Any:
        self.text_loads += 1
        return super().load_text_encoders(device, dtype)


@dataclass
class Run:
    prepared: PreparedData
    vae_loads: int
    text_loads: int

    @property
    def latent_counts(self) -> tuple[int, int]:
        stats = self.prepared.stats["latents"]
        assert stats.failed == []
        return stats.hits, stats.misses

    @property
    def text_counts(self) -> tuple[int, int]:
        stats = self.prepared.stats["text"]
        assert stats.failed == []
        return stats.hits, stats.misses

    @property
    def keys(self) -> dict[tuple[str, bool], str]:
        return self.prepared.latent_keys


class Rig:
    """A dataset, a model folder and a cache folder shared by every run of one test."""

    def __init__(self, root: Path, model: Path, data: Path, cache: Path) -> None:
        self.root = root
        self.model = model
        self.data = data
        self.cache = cache
        self.store = CacheStore(cache)

    def config(self, data: dict[str, Any] | None = None, cache: dict[str, Any] | None = None) -> DittuneConfig:
        return validate_config(
            {
                "output_dir": str(self.root / "out"),
                "model": {"family": "hunyuan-dit", "path": str(self.model)},
                "data": {"path": str(self.data), "resolution": 64, "resolution_type": "pixel", **(data or {})},
                "train": {"max_steps": 1},
                "cache": {"dir": str(self.cache), **(cache or {})},
            }
        )

    def run(
        self, data: dict[str, Any] | None = None, cache: dict[str, Any] | None = None, model: Path | None = None
    ) -> Run:
        spec = CountingSpec(model or self.model)
        vae_loads = 0

        def get_vae() -> torch.nn.Module:
            nonlocal vae_loads
            vae_loads += 1
            return spec.load_vae(CPU, torch.float32)

        prepared = prepare_data(
            self.config(data, cache),
            spec,
            device=CPU,
            compute_dtype="fp32",
            get_vae=get_vae,
            progress=False,
            announce=lambda _: None,
        )
        return Run(prepared, vae_loads, spec.text_loads)


def changed_samples(before: Run, after: Run) -> set[tuple[str, bool]]:
    return {job for job, key in after.keys.items() if before.keys.get(job) != key}


def all_samples(run: Run) -> set[tuple[str, bool]]:
    return set(run.keys)


@dataclass
class Seeded:
    """A dataset and a cache filled by one baseline run (shared by the module; tests work on copies)."""

    data: Path
    cache: Path
    baseline: Run


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Seeded:
    root = tmp_path_factory.mktemp("seeded-cache")
    rig = Rig(root, tiny_models["v1.2"], make_dataset(root / "data", SIZES, COLOURS), root / "cache")
    return Seeded(rig.data, rig.cache, rig.run())


@pytest.fixture
def rig(tmp_path: Path, tiny_models: dict[str, Path], seeded: Seeded) -> Rig:
    """Copies of the seeded dataset and cache; keys are content-addressed, so the copies still hit."""
    data = Path(shutil.copytree(seeded.data, tmp_path / "data"))
    cache = Path(shutil.copytree(seeded.cache, tmp_path / "cache"))
    return Rig(tmp_path, tiny_models["v1.2"], data, cache)


@pytest.fixture
def own_model(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """A private copy of the tiny v1.2 folder that a test may modify."""
    return Path(shutil.copytree(tiny_models["v1.2"], tmp_path / "model"))


# ------------------------------------------------------------------------------------------ scenarios


def test_baseline_misses_everything_then_unchanged_inputs_hit_everything(rig: Rig, seeded: Seeded) -> None:
    first = seeded.baseline
    # prompts = 2 distinct captions + the empty prompt (also the default negative prompt)
    assert set(first.prepared.text_keys) == {
        "",
        "a red circle on a white background",
        "a blue circle on a white background",
    }
    assert first.latent_counts == (0, IMAGES)
    assert first.text_counts == (0, 3)
    assert first.vae_loads == 1 and first.text_loads == 1
    assert len(rig.store.entries(LATENT)) == IMAGES and len(rig.store.entries(TEXT)) == 3

    second = rig.run()
    assert second.latent_counts == (IMAGES, 0)
    assert second.text_counts == (3, 0)
    assert second.vae_loads == 0
    assert second.text_loads == 0
    assert second.keys == first.keys
    assert second.prepared.text_keys == first.prepared.text_keys


def test_copied_model_and_dataset_still_hit(rig: Rig, seeded: Seeded, own_model: Path) -> None:
    """Keys are content-addressed: the same weights and pixels elsewhere produce the same keys."""
    first = seeded.baseline
    moved = Path(shutil.copytree(rig.data, rig.root / "moved-data"))
    shutil.rmtree(rig.data)
    rig.data = moved
    second = rig.run(model=own_model)
    assert second.latent_counts == (IMAGES, 0)
    assert second.text_counts == (3, 0)
    assert second.keys == first.keys


def test_edited_pixels_miss_only_that_image(rig: Rig, seeded: Seeded) -> None:
    first = seeded.baseline
    path = rig.data / "red_0.png"
    with Image.open(path) as image:
        edited = image.convert("RGB")
    ImageDraw.Draw(edited).rectangle([2, 2, 12, 12], fill=(0, 0, 0))
    edited.save(path)
    assert Image.open(path).size == (64, 64)

    second = rig.run()
    assert second.latent_counts == (IMAGES - 1, 1)
    assert second.text_counts == (3, 0)
    assert second.text_loads == 0
    assert changed_samples(first, second) == {("red_0.png", False)}


def test_changed_caption_misses_only_that_caption(rig: Rig, seeded: Seeded) -> None:
    first = seeded.baseline
    (rig.data / "red_0.txt").write_text("a red square on a white background")
    second = rig.run()
    assert second.latent_counts == (IMAGES, 0)
    assert second.vae_loads == 0
    # the old red caption is still used by red_1, so the prompt set grows by one
    assert len(second.prepared.text_keys) == 4
    assert second.text_counts == (3, 1)
    assert second.keys == first.keys


def test_resolution_change_re_encodes_every_latent_at_the_new_bucket(rig: Rig, seeded: Seeded) -> None:
    first = seeded.baseline
    second = rig.run(data={"resolution": 128})
    assert second.latent_counts == (0, IMAGES)
    assert second.text_counts == (3, 0)
    assert second.text_loads == 0
    # stale entries are never returned: every key is new, and each entry has the new bucket's shape
    assert set(second.keys.values()).isdisjoint(first.keys.values())
    for sample in second.prepared.plan.samples:
        width, height = sample.placement.bucket
        assert min(width, height) == 128
        entry = rig.store.load(LATENT, second.keys[(sample.key, False)])
        assert entry is not None
        assert entry["mean"].shape == (4, height // 8, width // 8)
        assert entry["logvar"].shape == (4, height // 8, width // 8)
    # and going back to 64 finds the original entries again
    third = rig.run()
    assert third.latent_counts == (IMAGES, 0)
    assert third.keys == first.keys


def test_random_crop_misses_only_images_whose_offset_moves(rig: Rig, seeded: Seeded) -> None:
    first = seeded.baseline
    spec = HunyuanDiTSpec(rig.model)
    centre = {s.key: s.placement.crop_left_top for s in plan_data(rig.config(), spec).samples}
    random = {s.key: s.placement.crop_left_top for s in plan_data(rig.config({"crop": "random"}), spec).samples}
    moved = {key for key in centre if centre[key] != random[key]}
    # the scenario must exercise both outcomes: squares that fill their bucket keep (0, 0) ...
    assert random["red_0.png"] == centre["red_0.png"] == (0, 0)
    # ... and at least one non-square image gets a different crop
    assert moved and len(moved) < IMAGES

    second = rig.run(data={"crop": "random"})
    assert second.latent_counts == (IMAGES - len(moved), len(moved))
    assert second.text_counts == (3, 0)
    assert changed_samples(first, second) == {(key, False) for key in moved}


def test_random_flip_adds_one_flipped_variant_per_image(rig: Rig, seeded: Seeded) -> None:
    first = seeded.baseline
    second = rig.run(data={"random_flip": True})
    assert second.latent_counts == (IMAGES, IMAGES)
    assert second.text_counts == (3, 0)
    names = {key for key, _ in first.keys}
    assert all_samples(second) == {(name, flip) for name in names for flip in (False, True)}
    assert all(second.keys[(name, False)] == first.keys[(name, False)] for name in names)
    assert all(second.keys[(name, True)] != second.keys[(name, False)] for name in names)
    # the flipped entry really holds the mirrored image's latents
    flipped = rig.store.load(LATENT, second.keys[("red_1.png", True)])
    plain = rig.store.load(LATENT, second.keys[("red_1.png", False)])
    assert flipped is not None and plain is not None
    assert not torch.allclose(flipped["mean"], plain["mean"])


def _perturb_weights(component: Path, load: Any) -> None:
    """Load a component, nudge one parameter, save it back; keep config.json byte-identical."""
    config = (component / "config.json").read_bytes()
    module = load(component)
    with torch.no_grad():
        next(module.parameters()).add_(0.05)
    module.save_pretrained(component)
    (component / "config.json").write_bytes(config)


def test_model_weights_invalidate_only_their_own_cache(rig: Rig, seeded: Seeded, own_model: Path) -> None:
    from diffusers import AutoencoderKL
    from transformers import BertModel, T5EncoderModel

    same = rig.run(model=own_model)
    assert same.latent_counts == (IMAGES, 0) and same.text_counts == (3, 0)
    text_before = rig.store.load(TEXT, same.prepared.text_keys["a red circle on a white background"])
    latent_before = rig.store.load(LATENT, same.keys[("red_0.png", False)])

    _perturb_weights(own_model / "vae", AutoencoderKL.from_pretrained)
    vae_changed = rig.run(model=own_model)
    assert vae_changed.latent_counts == (0, IMAGES)
    assert vae_changed.text_counts == (3, 0)
    assert vae_changed.text_loads == 0
    assert vae_changed.prepared.text_keys == same.prepared.text_keys
    latent_after = rig.store.load(LATENT, vae_changed.keys[("red_0.png", False)])
    assert latent_before is not None and latent_after is not None
    assert not torch.equal(latent_before["mean"], latent_after["mean"])

    _perturb_weights(own_model / "text_encoder", lambda p: BertModel.from_pretrained(p, add_pooling_layer=False))
    bert_changed = rig.run(model=own_model)
    assert bert_changed.text_counts == (0, 3)
    assert bert_changed.latent_counts == (IMAGES, 0)
    assert bert_changed.vae_loads == 0
    assert bert_changed.keys == vae_changed.keys
    text_after = rig.store.load(TEXT, bert_changed.prepared.text_keys["a red circle on a white background"])
    assert text_before is not None and text_after is not None
    assert not torch.equal(text_before["prompt_embeds"], text_after["prompt_embeds"])
    torch.testing.assert_close(text_before["prompt_embeds_2"], text_after["prompt_embeds_2"])

    _perturb_weights(own_model / "text_encoder_2", T5EncoderModel.from_pretrained)
    t5_changed = rig.run(model=own_model)
    assert t5_changed.text_counts == (0, 3)
    assert t5_changed.latent_counts == (IMAGES, 0)


def test_storage_dtypes_are_part_of_their_keys(rig: Rig, seeded: Seeded) -> None:
    bf16_latents = rig.run(cache={"latent_dtype": "bf16"})
    assert bf16_latents.latent_counts == (0, IMAGES)
    assert bf16_latents.text_counts == (3, 0)
    entry = rig.store.load(LATENT, bf16_latents.keys[("blue_1.png", False)])
    assert entry is not None and entry["mean"].dtype == torch.bfloat16

    bf16_text = rig.run(cache={"text_dtype": "bf16"})
    assert bf16_text.latent_counts == (IMAGES, 0)
    assert bf16_text.text_counts == (0, 3)
    embedding = rig.store.load(TEXT, bf16_text.prepared.text_keys[""])
    assert embedding is not None
    assert embedding["prompt_embeds"].dtype == torch.bfloat16
    assert embedding["prompt_attention_mask"].dtype == torch.int64  # masks are never cast


def test_touching_an_image_misses_in_stat_mode_only(rig: Rig, seeded: Seeded) -> None:
    content = seeded.baseline
    stat = rig.run(cache={"source_fingerprint": "stat"})
    assert stat.latent_counts == (0, IMAGES)  # a different fingerprint kind is a different key
    assert stat.text_counts == (3, 0)
    assert rig.run(cache={"source_fingerprint": "stat"}).latent_counts == (IMAGES, 0)

    path = rig.data / "blue_1.png"
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 5_000_000_000))

    touched_stat = rig.run(cache={"source_fingerprint": "stat"})
    assert touched_stat.latent_counts == (IMAGES - 1, 1)
    assert changed_samples(stat, touched_stat) == {("blue_1.png", False)}

    touched_content = rig.run()
    assert touched_content.latent_counts == (IMAGES, 0)
    assert touched_content.vae_loads == 0
    assert touched_content.keys == content.keys


def test_corrupted_entries_are_rebuilt(rig: Rig, seeded: Seeded) -> None:
    first = seeded.baseline
    latent_path = rig.store.path(LATENT, first.keys[("red_1.png", False)])
    latent_path.write_bytes(os.urandom(latent_path.stat().st_size))
    text_path = rig.store.path(TEXT, first.prepared.text_keys[""])
    text_path.write_bytes(b"\x00" * text_path.stat().st_size)

    second = rig.run()
    assert second.latent_counts == (IMAGES - 1, 1)
    assert second.text_counts == (2, 1)
    assert second.keys == first.keys
    assert rig.store.load(LATENT, second.keys[("red_1.png", False)]) is not None
    assert rig.store.load(TEXT, second.prepared.text_keys[""]) is not None


def test_entry_under_the_wrong_name_is_a_miss(rig: Rig, seeded: Seeded) -> None:
    first = seeded.baseline
    wrong = rig.store.path(LATENT, first.keys[("red_0.png", False)])
    right = rig.store.path(LATENT, first.keys[("blue_0.png", False)])
    shutil.copyfile(wrong, right)  # blue_0's slot now holds red_0's latents

    second = rig.run()
    assert second.latent_counts == (IMAGES - 1, 1)
    entry = rig.store.load(LATENT, first.keys[("blue_0.png", False)])
    assert entry is not None  # rebuilt under its own key


# --------------------------------------------------------------------------------------- CacheStore


def test_store_round_trip_is_atomic_and_keeps_dtypes(tmp_path: Path) -> None:
    store = CacheStore(tmp_path / "cache")
    tensors = {"mean": torch.randn(4, 2, 3).to(torch.bfloat16), "mask": torch.tensor([1, 1, 0])}
    path = store.save(LATENT, "ab" + "0" * 62, tensors, {"source": "x.png", "geometry": {"flip": False}})
    assert path == tmp_path / "cache" / LATENT / "ab" / f"ab{'0' * 62}.safetensors"
    # nothing but the entry is left behind (no temporary files)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    loaded = store.load(LATENT, "ab" + "0" * 62)
    assert loaded is not None
    assert loaded["mean"].dtype == torch.bfloat16 and torch.equal(loaded["mean"], tensors["mean"])
    assert torch.equal(loaded["mask"], tensors["mask"])
    assert store.fields(LATENT, "ab" + "0" * 62) == {"source": "x.png", "geometry": {"flip": False}}
    assert store.contains(LATENT, "ab" + "0" * 62)
    assert store.entries(LATENT) == [path]


def test_store_failed_save_leaves_no_files(tmp_path: Path) -> None:
    store = CacheStore(tmp_path)
    base = torch.zeros(4)
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error type for shared tensors
        store.save(TEXT, "cd" + "1" * 62, {"a": base, "b": base}, {})
    assert not store.contains(TEXT, "cd" + "1" * 62)
    assert list((tmp_path / TEXT / "cd").iterdir()) == []


def test_store_missing_damaged_and_misplaced_entries_load_as_none(tmp_path: Path) -> None:
    store = CacheStore(tmp_path)
    assert store.load(TEXT, "ef" + "2" * 62) is None
    assert store.fields(TEXT, "ef" + "2" * 62) is None

    damaged = store.save(TEXT, "ef" + "2" * 62, {"x": torch.ones(8)}, {})
    damaged.write_bytes(b"not a safetensors file at all")
    assert store.load(TEXT, "ef" + "2" * 62) is None
    assert not damaged.exists()  # removed, so the next build re-creates it

    key, other = "aa" + "3" * 62, "bb" + "4" * 62
    misplaced = store.path(TEXT, other)
    misplaced.parent.mkdir(parents=True)
    save_file({"x": torch.ones(2)}, str(misplaced), metadata={KEY_FIELD: key})
    assert store.load(TEXT, other) is None


# ------------------------------------------------------------------------------------- Fingerprinter


def test_fingerprinter_memo_is_written_and_reused(tmp_path: Path) -> None:
    image = tmp_path / "a.bin"
    image.write_bytes(b"A" * 1000)
    memo = tmp_path / "memo.json"
    first = Fingerprinter(memo)
    digest = first.file(image)
    assert digest == "sha256:" + sha256_file(image)
    first.save()
    recorded = json.loads(memo.read_text())
    assert any(str(image.resolve()) in stat_id for stat_id in recorded)
    assert set(recorded.values()) == {sha256_file(image)}

    # a same-size edit with the mtime restored: only a fresh hash can see it
    info = image.stat()
    image.write_bytes(b"B" * 1000)
    os.utime(image, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert Fingerprinter(memo).file(image) == digest, "a memoised hash must be reused, not recomputed"
    assert Fingerprinter().file(image) == "sha256:" + sha256_file(image) != digest
    assert Fingerprinter().file(image, "stat") == first.file(image, "stat")


def test_fingerprinter_content_mode_sees_same_size_edits(tmp_path: Path) -> None:
    image = tmp_path / "a.bin"
    image.write_bytes(b"A" * 1000)
    fingerprinter = Fingerprinter(tmp_path / "memo.json")
    before = fingerprinter.file(image)
    info = image.stat()
    image.write_bytes(b"B" * 1000)
    os.utime(image, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    assert fingerprinter.file(image) != before
    # touching alone changes the stat fingerprint but not the content one
    after = fingerprinter.file(image)
    stat_before = fingerprinter.file(image, "stat")
    os.utime(image, ns=(info.st_atime_ns, info.st_mtime_ns + 2_000_000_000))
    assert fingerprinter.file(image) == after
    assert fingerprinter.file(image, "stat") != stat_before


def test_folder_fingerprint_tracks_weights_and_configs_by_relative_name(tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    (one / "config.json").write_text('{"a": 1}')
    save_file({"w": torch.zeros(3)}, str(one / "model.safetensors"))
    (one / "notes.md").write_text("ignored")
    fingerprinter = Fingerprinter()
    reference = fingerprinter.folder(one)

    two = Path(shutil.copytree(one, tmp_path / "two"))
    assert fingerprinter.folder(two) == reference
    (two / "notes.md").write_text("still ignored")
    assert fingerprinter.folder(two) == reference
    save_file({"w": torch.tensor([0.0, 0.0, 1e-3])}, str(two / "model.safetensors"))
    assert fingerprinter.folder(two) != reference
    shutil.copyfile(one / "model.safetensors", two / "model.safetensors")
    assert fingerprinter.folder(two) == reference
    (two / "config.json").write_text('{"a": 2}')
    assert fingerprinter.folder(two) != reference
