"""Fill the text-embedding and latent caches, computing only what is missing.

Keys hash everything that produced an entry:
- text: the prompt, the spec's text identity (tokenizer and encoder fingerprints, max lengths,
  padding), the encoders' compute dtype and the storage dtype;
- latents: the source file fingerprint, the geometry (bucket, resize, crop, flip, resize method; for a
  clip also the chosen source frames, its rate and the decoder version: what the frame count, fps,
  sampling mode and start frame decide), the spec's VAE identity (plus tiling when on), the VAE compute
  dtype and the storage dtype. A ControlNet conditioning image is a latent job like any other: its source
  is the control file and its geometry its target's, plus ``"role": "control"``.

Every entry is encoded alone (one image, clip or prompt per encoder call): batched encoders are not
bit-identical to unbatched ones, so an entry's bytes would otherwise depend on which other entries happened
to be missing with it (a run killed while caching would resume on different latents). The store checks
every entry's checksum before it counts as cached, so a damaged entry is reported, deleted and re-encoded.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dittune.cache.store import CacheStore
from dittune.fingerprint import Fingerprinter, FingerprintMode, canonical_hash
from dittune.models.base import ModelSpec

TEXT = "text"
LATENT = "latents"
FORMAT_VERSION = 2
"""Bump when the stored layout or the way entries are encoded changes; it is part of every key, so older
entries simply miss (and stay on disk until the cache folder is cleaned). 2: entries carry a checksum and are
encoded one at a time."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    damaged: list[tuple[Path, str]] = field(default_factory=list)
    """(entry file, reason) of the damaged entries found, deleted and re-encoded (counted in `misses`)."""
    seconds: float = 0.0
    unit: str = ""
    """What was encoded ("clip" or "img") when a rate is worth showing; "" shows none."""
    megabytes: float = 0.0
    """Size of the entries the run uses (cached and new)."""

    def line(self, what: str) -> str:
        text = f"{what}: {self.hits} cached, {self.misses} encoded"
        if self.failed:
            text += f", {len(self.failed)} failed"
        if self.damaged:
            text += f", {len(self.damaged)} damaged entr{'y' if len(self.damaged) == 1 else 'ies'} replaced"
        details = [f"{self.seconds:.1f} s"]
        if self.unit and self.misses and self.seconds > 0:
            details.append(f"{self.misses / self.seconds:.2f} {self.unit}s/s")
        if self.megabytes:
            details.append(f"{self.megabytes:.1f} MB")
        return text + f" ({', '.join(details)})"


@dataclass(frozen=True)
class Shard:
    """This process's share of cache work when several processes fill one cache: the missing entries are
    numbered, process `rank` of `world` encodes those whose number ≡ rank (mod world), then everyone meets at
    `barrier` and reads what the others wrote. One process: everything, no barrier."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None

    def mine(self, items: Sequence[Any]) -> list[Any]:
        return [item for number, item in enumerate(items) if number % self.world == self.rank]

    @property
    def shows_progress(self) -> bool:
        return self.rank == 0


ONE_PROCESS = Shard()
"""The share of a single process: all the work, no barrier."""


@dataclass(frozen=True)
class LatentJob:
    """One image variant to encode: where it comes from, its geometry, and how to load it."""

    source: Path
    geometry: dict[str, Any]
    group: tuple[int, ...]
    """Jobs of one group have the same tensor shape and are encoded together: (width, height, frames)."""
    load: Callable[[], torch.Tensor]
    """Returns (3, F, H, W) pixels in [-1, 1] (F = 1 for a still)."""


def present(store: CacheStore, kind: str, keys: Sequence[str]) -> list[bool]:
    """Which of `keys` have an intact entry (checksums verified on a few threads: reads and SHA-256 release
    the GIL); damaged entries are deleted and recorded in `store.damaged`."""
    if len(keys) < 2:
        return [store.contains(kind, key) for key in keys]
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="dittune-verify") as pool:
        return list(pool.map(lambda key: store.contains(kind, key), keys))


def _stored(tensors: dict[str, torch.Tensor], storage: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(storage) if v.is_floating_point() else v for k, v in tensors.items()}


def text_key(identity: dict[str, Any], prompt: str, compute_dtype: str, storage_dtype: str) -> str:
    fields = {"v": FORMAT_VERSION, "identity": identity, "prompt": prompt}
    return canonical_hash({**fields, "compute": compute_dtype, "storage": storage_dtype})


def ensure_text_embeddings(
    spec: ModelSpec,
    store: CacheStore,
    prompts: Iterable[str],
    *,
    fingerprinter: Fingerprinter,
    device: torch.device,
    compute_dtype: str,
    storage_dtype: str,
    progress: bool = True,
    shard: Shard = ONE_PROCESS,
) -> tuple[dict[str, str], CacheStats]:
    """Make sure every prompt has a cached, intact embedding; returns prompt → key and the stats.

    Prompts are encoded one at a time (an embedding's bytes never depend on the other prompts). Text encoders
    are loaded only when something is missing (in this process's `shard`), and released before returning.
    With several processes all check the cache, then each encodes its share, then all wait for the others.
    """
    start = time.perf_counter()
    identity = spec.text_identity(fingerprinter)
    keys = {p: text_key(identity, p, compute_dtype, storage_dtype) for p in dict.fromkeys(prompts)}
    damaged_before = len(store.damaged)
    missing = [p for p, ok in zip(keys, present(store, TEXT, list(keys.values()))) if not ok]
    stats = CacheStats(hits=len(keys) - len(missing), misses=len(missing), damaged=store.damaged[damaged_before:])
    if shard.world > 1:
        shard.barrier()  # nobody writes before everyone has listed what is missing
    mine = shard.mine(missing)
    if mine:
        encoders = spec.load_text_encoders(device, DTYPES[compute_dtype])
        try:
            show = progress and shard.shows_progress
            bar = tqdm(total=len(mine), desc="Encoding captions", unit="caption", disable=not show)
            for prompt in mine:
                (embedding,) = spec.encode_prompts(encoders, [prompt])
                fields = {"prompt": prompt, "compute": compute_dtype, "storage": storage_dtype}
                store.save(TEXT, keys[prompt], _stored(embedding, DTYPES[storage_dtype]), fields)
                bar.update(1)
            bar.close()
        finally:
            del encoders
            release_memory()
    if shard.world > 1:
        shard.barrier()
        absent = [p for p in missing if not store.contains(TEXT, keys[p])]
        if absent:
            raise RuntimeError(f"{len(absent)} text embedding(s) were not written by the other processes")
    stats.seconds = time.perf_counter() - start
    return keys, stats


def latent_key(
    identity: dict[str, Any], source_fingerprint: str, geometry: dict[str, Any], compute_dtype: str, storage_dtype: str
) -> str:
    return canonical_hash(
        {
            "v": FORMAT_VERSION,
            "identity": identity,
            "source": source_fingerprint,
            "geometry": geometry,
            "compute": compute_dtype,
            "storage": storage_dtype,
        }
    )


def ensure_latents(
    spec: ModelSpec,
    store: CacheStore,
    jobs: Sequence[LatentJob],
    *,
    get_vae: Callable[[], torch.nn.Module],
    fingerprinter: Fingerprinter,
    source_mode: FingerprintMode,
    compute_dtype: str,
    storage_dtype: str,
    batch_size: int,
    load_errors: tuple[type[BaseException], ...] = (OSError, ValueError),
    progress: bool = True,
    vae_options: dict[str, Any] | None = None,
    shard: Shard = ONE_PROCESS,
    desc: str = "Encoding latents",
) -> tuple[list[str | None], CacheStats]:
    """Make sure every job has cached, intact VAE moments; returns one key per job (None if it failed).

    Each image or clip is encoded alone, so its entry is bit-identical whichever others were missing with it;
    `batch_size` images are loaded ahead per chunk. Damaged entries are found (checksums), deleted, re-encoded
    and listed in the stats.

    Failed loads (corrupt or truncated files) are reported in the stats, never raised. The VAE is
    requested from `get_vae` only when something is missing. `load_errors` are the exception types
    a job's loader raises for a bad image. `vae_options` (e.g. tiling) join the VAE identity in the keys.
    With several processes (`shard`), each encodes its share of the missing entries, then all wait for the
    others; an entry another process could not encode is reported as failed on every process. `desc` labels
    the progress bar.
    """
    start = time.perf_counter()
    identity = {**spec.vae_identity(fingerprinter), **(vae_options or {})}
    keys: list[str | None] = []
    stats = CacheStats()
    for job in jobs:
        try:
            source = fingerprinter.file(job.source, source_mode)
        except OSError as error:
            stats.failed.append((job.source, f"cannot read file: {error}"))
            keys.append(None)
            continue
        keys.append(latent_key(identity, source, job.geometry, compute_dtype, storage_dtype))
    fingerprinter.save()
    damaged_before = len(store.damaged)
    known = [index for index, key in enumerate(keys) if key is not None]
    cached = present(store, LATENT, [keys[index] for index in known])  # type: ignore[misc]
    todo: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, ok in zip(known, cached):
        if not ok:
            todo[jobs[index].group].append(index)
    missing = [index for indices in todo.values() for index in indices]
    stats.hits = len(known) - len(missing)
    stats.damaged = store.damaged[damaged_before:]
    if shard.world > 1:
        shard.barrier()  # nobody writes before everyone has listed what is missing
    mine = set(shard.mine(missing))
    todo = {group: [i for i in indices if i in mine] for group, indices in todo.items() if set(indices) & mine}
    clips = any(job.group[2:] not in ((), (1,)) for job in jobs)
    if todo:
        vae = get_vae()
        # Clips are loaded one at a time (bounded memory, progress per clip); stills `batch_size` ahead.
        chunks = [chunk for indices in todo.values() for chunk in _split(indices, 1 if clips else batch_size)]
        show = progress and shard.shows_progress
        bar = tqdm(total=len(mine), desc=desc, unit="clip" if clips else "img", disable=not show)
        with _Pipeline(jobs, load_errors) as pipeline:
            for chunk, (loaded, failures) in zip(chunks, pipeline.loaded(chunks)):
                for index, reason in failures:
                    stats.failed.append((jobs[index].source, reason))
                    keys[index] = None
                for index, pixels in loaded:
                    (moments,) = spec.encode_pixels(vae, pixels.unsqueeze(0))  # alone: bytes independent of others
                    job, key = jobs[index], keys[index]
                    fields = {"source": str(job.source), "geometry": job.geometry, "compute": compute_dtype}
                    assert key is not None
                    pipeline.save(store, LATENT, key, _stored(moments, DTYPES[storage_dtype]), fields)
                bar.update(len(chunk))
            stats.misses += pipeline.wait_for_writes()
        bar.close()
    if missing:
        stats.unit = "clip" if clips else "img"
    if shard.world > 1:
        _collect_others(store, jobs, keys, [i for i in missing if i not in mine], stats, shard)
    stats.seconds = time.perf_counter() - start
    stats.megabytes = _megabytes(store, {key for key in keys if key is not None})
    return keys, stats


def _collect_others(
    store: CacheStore,
    jobs: Sequence[LatentJob],
    keys: list[str | None],
    theirs: list[int],
    stats: CacheStats,
    shard: Shard,
) -> None:
    """After the barrier: count the entries the other processes wrote; one they could not write failed here too."""
    shard.barrier()
    for index in theirs:
        key = keys[index]
        if key is not None and store.contains(LATENT, key):
            stats.misses += 1
        else:
            stats.failed.append((jobs[index].source, "failed to decode in another process (see its log)"))
            keys[index] = None


def _megabytes(store: CacheStore, keys: set[str]) -> float:
    total = 0
    for key in keys:
        try:
            total += store.path(LATENT, key).stat().st_size
        except OSError:
            continue
    return total / 1e6


def _split(indices: list[int], size: int) -> list[list[int]]:
    return [indices[first : first + size] for first in range(0, len(indices), size)]


class _Pipeline:
    """Loads the next chunk of images on worker threads while the VAE encodes this one, and writes entries on a
    thread of their own, so decoding, resizing and file writes overlap the encoder instead of adding to it.

    Chunks come back in order; a failed load is reported with its reason, never raised. A failed write is raised
    by `wait_for_writes`.
    """

    def __init__(self, jobs: Sequence[LatentJob], load_errors: tuple[type[BaseException], ...]) -> None:
        self.jobs = jobs
        self.load_errors = load_errors
        workers = max(1, min(4, (os.cpu_count() or 2) - 1))
        self._loader = ThreadPoolExecutor(workers, thread_name_prefix="dittune-load")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="dittune-write")
        self._writes: list[Future] = []

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True)

    def _load(self, index: int) -> torch.Tensor | str:
        try:
            return self.jobs[index].load()
        except self.load_errors as error:
            return str(error)

    def _submit(self, chunk: list[int]) -> list[tuple[int, Future]]:
        return [(index, self._loader.submit(self._load, index)) for index in chunk]

    def loaded(
        self, chunks: Sequence[list[int]]
    ) -> Iterator[tuple[list[tuple[int, torch.Tensor]], list[tuple[int, str]]]]:
        """Per chunk: (index, pixels) of the images that loaded and (index, reason) of those that did not."""
        pending = self._submit(chunks[0]) if chunks else []
        for position in range(len(chunks)):
            current = pending
            if position + 1 < len(chunks):
                pending = self._submit(chunks[position + 1])  # prefetch: loads while this chunk is encoded
            results = [(index, future.result()) for index, future in current]
            yield (
                [(index, value) for index, value in results if isinstance(value, torch.Tensor)],
                [(index, value) for index, value in results if isinstance(value, str)],
            )

    def save(self, store: CacheStore, kind: str, key: str, tensors: dict[str, torch.Tensor], fields: dict) -> None:
        self._writes.append(self._writer.submit(store.save, kind, key, tensors, fields))

    def wait_for_writes(self) -> int:
        """Entries written; raises the first write error."""
        for future in self._writes:
            future.result()
        return len(self._writes)


def release_memory() -> None:
    """Return freed encoder memory to the system / accelerator."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
