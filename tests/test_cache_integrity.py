"""Cache integrity: every entry carries a checksum; a damaged one is reported, deleted and re-encoded to the same
bytes, never trained on; and an entry's bytes do not depend on the batch it was encoded in.

The `prepare_data` scenarios run the real tiny PixArt-Σ on four 64×64 images (one bucket, so the old batched
encoder put them in one VAE batch); the batch-independence checks also run a video VAE (LTX-Video) and the
three text encoders of SD3 (whose batched T5/CLIP outputs differ from unbatched ones in the last bits).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import make_dataset
from dittune.cache.build import LATENT, TEXT, LatentJob, ensure_latents, ensure_text_embeddings
from dittune.cache.store import CHECKSUM_FIELD, KEY_FIELD, CacheStore
from dittune.config.load import validate_config
from dittune.fingerprint import Fingerprinter
from dittune.models.base import ModelSpec
from dittune.models.registry import spec_class, tiny_builder
from dittune.train.batches import CachedBatches
from dittune.train.prepare import PreparedData, prepare_data

CPU = torch.device("cpu")
COLOURS = ("red", "blue", "green", "yellow")

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Rig:
    model: Path
    data: Path
    cache: Path

    @property
    def store(self) -> CacheStore:
        return CacheStore(self.cache)

    def prepare(self) -> PreparedData:
        cfg = validate_config(
            {
                "output_dir": str(self.cache.parent / "out"),
                "model": {"family": "pixart-sigma", "path": str(self.model)},
                "data": {"path": str(self.data), "resolution": 64, "resolution_type": "pixel"},
                "train": {"max_steps": 1},
                "cache": {"dir": str(self.cache), "vae_batch_size": 4, "text_batch_size": 8},
            }
        )
        spec = spec_class("pixart-sigma")(self.model)
        return prepare_data(
            cfg,
            spec,
            device=CPU,
            compute_dtype="fp32",
            get_vae=lambda: spec.load_vae(CPU, torch.float32),
            progress=False,
            announce=lambda _: None,
        )


@dataclass
class Seeded:
    rig: Rig
    prepared: PreparedData
    files: dict[Path, bytes]
    """Every entry file of the baseline cache → its bytes."""


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    root = tmp_path_factory.mktemp("integrity")
    model = tiny_builder("pixart-sigma")(root / "model", seed=0)
    rig = Rig(model, make_dataset(root / "data", ((64, 64),), COLOURS), root / "cache")
    prepared = rig.prepare()
    assert prepared.stats["latents"].misses == len(COLOURS)
    files = {path: path.read_bytes() for kind in (LATENT, TEXT) for path in rig.store.entries(kind)}
    return Seeded(rig, prepared, files)


@pytest.fixture
def rig(tmp_path: Path, seeded: Seeded) -> Rig:
    """The seeded model and data with a private copy of the cache (keys are content-addressed: it still hits)."""
    return Rig(seeded.rig.model, seeded.rig.data, Path(shutil.copytree(seeded.rig.cache, tmp_path / "cache")))


def content(data: bytes) -> tuple[str, bytes]:
    """An entry file's checksum and tensor bytes (the header's metadata order is not fixed: safetensors)."""
    start = 8 + int.from_bytes(data[:8], "little")
    return json.loads(data[8:start])["__metadata__"][CHECKSUM_FIELD], data[start:]


def same_as_baseline(seeded: Seeded, rig: Rig, kind: str, key: str) -> bool:
    """Whether the rig's entry holds the baseline's tensors, byte for byte."""
    return content(rig.store.path(kind, key).read_bytes()) == content(seeded.files[seeded.rig.store.path(kind, key)])


def payload_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def retype(path: Path) -> None:
    """Declare the entry's fp32 tensors int32: the file stays valid safetensors (same sizes), the header differs."""
    data = path.read_bytes()
    start = payload_start(path)
    header = json.loads(data[8:start])
    for name, info in header.items():
        if name != "__metadata__":
            assert info["dtype"] == "F32"
            info["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(data[:8] + text.ljust(start - 8) + data[start:])
    with safe_open(str(path), "pt") as still_valid:
        assert still_valid.get_tensor("mean").dtype == torch.int32


def flip_bits(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0b0100_0001
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------- damaged entries are rebuilt


def test_flipped_payload_bits_are_reported_deleted_and_re_encoded_to_the_same_bytes(
    rig: Rig, seeded: Seeded, caplog: pytest.LogCaptureFixture
) -> None:
    latent_key = seeded.prepared.latent_keys[("red_0.png", False)]
    text_key = seeded.prepared.text_keys["a blue circle on a white background"]
    latent, text = rig.store.path(LATENT, latent_key), rig.store.path(TEXT, text_key)
    flip_bits(latent, payload_start(latent) + 100)
    flip_bits(text, payload_start(text) + 7)
    with safe_open(str(latent), "pt") as still_valid:  # the flip keeps a valid safetensors file
        assert torch.isfinite(still_valid.get_tensor("mean")).any()

    with caplog.at_level(logging.WARNING, logger="dittune.cache.store"):
        again = rig.prepare()
    latents, texts = again.stats["latents"], again.stats["text"]
    assert (latents.hits, latents.misses, texts.misses) == (len(COLOURS) - 1, 1, 1)
    assert [path for path, _ in latents.damaged] == [latent] and [path for path, _ in texts.damaged] == [text]
    assert "checksum mismatch" in latents.damaged[0][1] and "checksum mismatch" in texts.damaged[0][1]
    assert str(latent) in caplog.text and str(text) in caplog.text
    assert "1 damaged entry replaced" in latents.line("latents")
    assert same_as_baseline(seeded, rig, LATENT, latent_key) and same_as_baseline(seeded, rig, TEXT, text_key)


def test_truncated_retyped_and_unchecksummed_entries_are_rebuilt(rig: Rig, seeded: Seeded) -> None:
    keys = [seeded.prepared.latent_keys[(f"{colour}_0.png", False)] for colour in COLOURS[:3]]
    truncated, retyped, old_format = (rig.store.path(LATENT, key) for key in keys)
    truncated.write_bytes(truncated.read_bytes()[:-10])
    retype(retyped)
    save_file({"mean": torch.zeros(1), "logvar": torch.zeros(1)}, str(old_format), metadata={KEY_FIELD: keys[2]})

    again = rig.prepare()
    reasons = dict(again.stats["latents"].damaged)
    assert set(reasons) == {truncated, retyped, old_format}
    assert "truncated" in reasons[truncated]
    assert "checksum mismatch" in reasons[retyped]
    assert "no checksum" in reasons[old_format]
    for key in keys:
        assert same_as_baseline(seeded, rig, LATENT, key)


def test_a_killed_cache_fill_resumes_to_the_same_bytes(rig: Rig, seeded: Seeded) -> None:
    """A kill while caching leaves some entries of a VAE chunk written and others not (or half written, as a
    stray temporary file): the rerun encodes the missing ones alone, and they equal the uninterrupted run's."""
    written = {seeded.prepared.latent_keys[(f"{colour}_0.png", False)] for colour in COLOURS[:3]}
    for key in set(seeded.prepared.latent_keys.values()) - written:
        path = rig.store.path(LATENT, key)
        path.with_name(f".{path.name}.tmp").write_bytes(path.read_bytes()[:50])
        path.unlink()
    rig.store.path(TEXT, seeded.prepared.text_keys[""]).unlink()

    again = rig.prepare()
    assert (again.stats["latents"].hits, again.stats["latents"].misses) == (3, 1)
    assert again.stats["text"].misses == 1
    for kind, keys in ((LATENT, again.latent_keys), (TEXT, again.text_keys)):
        assert all(same_as_baseline(seeded, rig, kind, key) for key in keys.values())


def test_an_entry_damaged_after_caching_never_reaches_a_batch(rig: Rig, seeded: Seeded) -> None:
    """Damage between the cache fill and a training step: loading checks the checksum, so the step stops with
    an error (the damaged file deleted and reported) and the next fill re-encodes it; corrupt data never loads."""
    prepared = seeded.prepared
    spec: ModelSpec = spec_class("pixart-sigma")(rig.model)
    store = rig.store
    batches = CachedBatches(store, prepared, spec.text_encoders, {}, CPU)
    items = [(index, False) for index in range(len(prepared.plan.samples))]
    clean = batches.collate(items, torch.Generator().manual_seed(0))

    key = prepared.latent_keys[(prepared.plan.samples[1].key, False)]
    path = store.path(LATENT, key)
    data = bytearray(path.read_bytes())
    data[payload_start(path) : payload_start(path) + 4] = b"\xff\xff\xff\x7f"  # a NaN in the first value
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=key):
        batches.collate(items, torch.Generator().manual_seed(0))
    assert not path.exists() and [(p, "checksum mismatch" in why) for p, why in store.damaged] == [(path, True)]

    again = rig.prepare()
    assert again.stats["latents"].misses == 1 and again.latent_keys == prepared.latent_keys
    batch = CachedBatches(rig.store, again, spec.text_encoders, {}, CPU).collate(
        items, torch.Generator().manual_seed(0)
    )
    for name, value in batch.moments.items():
        assert torch.isfinite(value).all() and torch.equal(value, clean.moments[name])


def test_contains_verifies_the_data_unless_asked_for_the_header_only(tmp_path: Path) -> None:
    store, key = CacheStore(tmp_path), "ab" + "5" * 62
    path = store.save(LATENT, key, {"mean": torch.arange(6.0), "mask": torch.tensor([True, False])}, {})
    assert store.fields(LATENT, key) == {}
    with safe_open(str(path), "pt") as entry:
        assert len(entry.metadata()[CHECKSUM_FIELD]) == 64
    flip_bits(path, payload_start(path) + 3)
    assert store.contains(LATENT, key, verify=False)  # header only: length, key and checksum present
    assert path.exists()
    assert not store.contains(LATENT, key)  # the data: checksum mismatch, deleted
    assert not path.exists() and store.damaged[0][0] == path


# -------------------------------------------------------------------- bytes independent of the batch


def _jobs(folder: Path, shape: tuple[int, int, int], count: int) -> list[LatentJob]:
    """`count` jobs of one group with distinct seeded pixels (3, F, H, W); F, H, W = `shape`."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for index in range(count):
        source = folder / f"item_{index}.bin"
        source.write_bytes(bytes([index]) * 16)
        pixels = torch.rand((3, *shape), generator=torch.Generator().manual_seed(index)) * 2 - 1
        jobs.append(LatentJob(source, {"index": index}, (shape[2], shape[1], shape[0]), partial(pixels.clone)))
    return jobs


def _encode_latents(spec: ModelSpec, root: Path, jobs: list[LatentJob]) -> dict[str, torch.Tensor]:
    """The first job's cached moments after encoding `jobs` together (batch size = all of them)."""
    store = CacheStore(root / "cache")
    keys, stats = ensure_latents(
        spec,
        store,
        jobs,
        get_vae=lambda: spec.load_vae(CPU, torch.float32),
        fingerprinter=Fingerprinter(root / "memo.json"),
        source_mode="content",
        compute_dtype="fp32",
        storage_dtype="fp32",
        batch_size=len(jobs),
        progress=False,
    )
    assert stats.misses == len(jobs) and keys[0] is not None
    entry = store.load(LATENT, keys[0])
    assert entry is not None
    return entry


@pytest.mark.parametrize(("family", "shape"), [("pixart-sigma", (1, 32, 32)), ("ltx-video", (9, 32, 32))])
def test_a_latent_encoded_alone_equals_it_encoded_among_others(
    tmp_path: Path, family: str, shape: tuple[int, int, int]
) -> None:
    spec = spec_class(family)(tiny_builder(family)(tmp_path / "model", seed=0))
    jobs = _jobs(tmp_path / "sources", shape, 4)
    alone = _encode_latents(spec, tmp_path / "alone", jobs[:1])
    among = _encode_latents(spec, tmp_path / "among", jobs)
    assert alone.keys() == among.keys() and all(torch.equal(alone[k], among[k]) for k in alone)
    # (what a batched encoder gives for the same image differs in the last bits; this is why entries are alone)
    vae = spec.load_vae(CPU, torch.float32)
    batched = spec.encode_pixels(vae, torch.stack([job.load() for job in jobs]))[0]
    assert all(torch.allclose(batched[k], alone[k], atol=1e-4) for k in alone)


def test_a_text_embedding_encoded_alone_equals_it_encoded_among_others(tmp_path: Path) -> None:
    spec = spec_class("sd3")(tiny_builder("sd3")(tmp_path / "model", seed=0))
    prompts = ["a red circle", "a much longer caption about a blue square on a grey table", "", "x"]

    def embedding(root: Path, chosen: list[str]) -> dict[str, torch.Tensor]:
        store = CacheStore(root)
        keys, stats = ensure_text_embeddings(
            spec,
            store,
            chosen,
            fingerprinter=Fingerprinter(root / "memo.json"),
            device=CPU,
            compute_dtype="fp32",
            storage_dtype="fp32",
            progress=False,
        )
        assert stats.misses == len(chosen)
        entry = store.load(TEXT, keys[prompts[0]])
        assert entry is not None
        return entry

    alone, among = embedding(tmp_path / "alone", prompts[:1]), embedding(tmp_path / "among", prompts)
    assert alone.keys() == among.keys() and all(torch.equal(alone[k], among[k]) for k in alone)
