"""`ensure_latents` loads ahead and writes behind the encoder: same keys, entries and failures as one at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dittune.cache.build import LATENT, LatentJob, ensure_latents
from dittune.cache.store import CacheStore
from dittune.fingerprint import Fingerprinter


class BadImage(OSError):
    pass


class FakeSpec:
    """Just what `ensure_latents` asks of a spec: the VAE identity and `encode_pixels` (moments = pixel means)."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def vae_identity(self, fingerprinter: Fingerprinter) -> dict[str, Any]:
        return {"vae": "fake"}

    def encode_pixels(self, vae: Any, pixels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        self.batches.append(pixels.shape[0])
        return [{"mean": p.mean(dim=0, keepdim=True), "logvar": torch.zeros(1, 2, 2)} for p in pixels]


def loader(value: float, fails: bool) -> Any:
    def load() -> torch.Tensor:
        if fails:
            raise BadImage("cannot identify image file")
        return torch.full((3, 2, 2), value)

    return load


@pytest.fixture
def jobs(tmp_path: Path) -> list[LatentJob]:
    sources = []
    for index in range(7):
        path = tmp_path / f"img_{index}.png"
        path.write_bytes(bytes([index]) * 10)
        sources.append(path)
    return [
        LatentJob(path, {"index": index}, (2, 2) if index % 3 else (4, 4), loader(float(index), fails=index == 4))
        for index, path in enumerate(sources)
    ]


def run(tmp_path: Path, jobs: list[LatentJob], spec: FakeSpec, store: CacheStore) -> tuple[list[str | None], Any]:
    return ensure_latents(
        spec,  # type: ignore[arg-type]
        store,
        jobs,
        get_vae=lambda: torch.nn.Identity(),
        fingerprinter=Fingerprinter(tmp_path / "memo.json"),
        source_mode="content",
        compute_dtype="fp32",
        storage_dtype="fp32",
        batch_size=2,
        load_errors=(BadImage,),
        progress=False,
    )


def test_pipelined_build_writes_every_entry_and_reports_failures(tmp_path: Path, jobs: list[LatentJob]) -> None:
    spec, store = FakeSpec(), CacheStore(tmp_path / "cache")
    keys, stats = run(tmp_path, jobs, spec, store)
    assert keys[4] is None and stats.failed == [(jobs[4].source, "cannot identify image file")]
    assert stats.misses == 6 and stats.hits == 0
    assert spec.batches == [1] * 6  # loaded 2 ahead ((2, 2): [1 2] [4 fails, 5]; (4, 4): [0 3] [6]), encoded alone
    for index, key in enumerate(keys):
        if key is not None:
            entry = store.load(LATENT, key)
            assert entry is not None and torch.equal(entry["mean"], torch.full((1, 2, 2), float(index)))
            assert store.fields(LATENT, key)["geometry"] == {"index": index}

    again = FakeSpec()
    keys_again, stats_again = run(tmp_path, jobs, again, store)
    assert keys_again[:4] == keys[:4] and keys_again[5:] == keys[5:] and keys_again[4] is None
    assert stats_again.hits == 6 and again.batches == [] and len(stats_again.failed) == 1  # only it is retried


def test_a_failed_write_is_raised(tmp_path: Path, jobs: list[LatentJob], monkeypatch: pytest.MonkeyPatch) -> None:
    store = CacheStore(tmp_path / "cache")

    def broken_save(*args: Any, **kwargs: Any) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(store, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, jobs, FakeSpec(), store)
