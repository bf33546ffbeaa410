"""Deterministic, resumable batch order: every batch from one bucket, every epoch a pure function of the seed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

Bucket = tuple[int, ...]
"""A bucket key: (width, height, frames) in the trainer; any tuple of ints here."""
BatchItem = tuple[int, bool]
"""(sample index, horizontal flip)."""

_SETTING_NAMES = ("global_batch", "repeats", "shuffle", "drop_incomplete", "random_flip")


@dataclass(frozen=True)
class MicroBatch:
    """One process's share of one micro-batch: its items and their positions in the step's global batch."""

    items: list[BatchItem]
    positions: list[int]


class BucketBatchSampler:
    """Yields batches of (sample_index, flip) drawn from a single bucket.

    Epoch `e` is computed from (`seed`, `e`) alone: within each bucket, each repeat pass is shuffled
    separately (so every sample appears `repeats` times per epoch), the result is cut into batches (the
    last partial one kept unless `drop_incomplete`), a flip is drawn per sample occurrence with
    probability 0.5 when `random_flip`, and finally the batch order is shuffled across buckets. With
    `shuffle=False` the order is buckets sorted by size, indices in the given order.

    A batch here is the *global* batch of one optimizer step: `batch_size × world × accumulation` samples.
    `next_step` cuts it into `accumulation` micro-batches, each split between the `world` processes, and process
    `rank` takes its `batch_size` slice of each; sample `g` of the global batch goes to micro-batch
    `g // (batch_size·world)` and process `(g // batch_size) % world`. Every split of the same global batch
    therefore sees the same samples in the same order, and the epoch layout depends on the global batch only.
    A last, incomplete global batch is split evenly; when it does not divide, it is topped up with its own
    first samples (as torch's DistributedSampler pads), so every process steps together.
    """

    def __init__(
        self,
        buckets: dict[Bucket, list[int]],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_incomplete: bool = False,
        random_flip: bool = False,
        repeats: int = 1,
        rank: int = 0,
        world: int = 1,
        accumulation: int = 1,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world} process(es)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if accumulation < 1:
            raise ValueError(f"accumulation must be at least 1, got {accumulation}")
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        self._buckets = {bucket: list(indices) for bucket, indices in sorted(buckets.items()) if indices}
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_incomplete = drop_incomplete
        self.random_flip = random_flip
        self.repeats = repeats
        self.rank, self.world, self.accumulation = rank, world, accumulation
        self.fingerprint = _layout_fingerprint(self._buckets)
        if self.batches_per_epoch == 0:
            sizes = ", ".join(f"{'×'.join(map(str, b))}: {len(indices)}" for b, indices in self._buckets.items())
            raise ValueError(
                f"no full batch of {self.global_batch} can be formed (samples per bucket: {sizes or 'none'}, "
                f"repeats {repeats}) and incomplete batches are dropped"
            )
        self._epoch = 0
        self._position = 0
        self._cached_epoch: int | None = None
        self._cached_batches: list[list[MicroBatch]] = []

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, over every process and micro-batch."""
        return self.batch_size * self.world * self.accumulation

    @property
    def batches_per_epoch(self) -> int:
        """Number of global batches (optimizer steps) in every epoch."""
        total = 0
        for indices in self._buckets.values():
            full, remainder = divmod(len(indices) * self.repeats, self.global_batch)
            total += full + (1 if remainder and not self.drop_incomplete else 0)
        return total

    def epoch_batches(self, epoch: int) -> list[list[MicroBatch]]:
        """This process's micro-batches of each step of `epoch`, in order (a pure function of the epoch, seed,
        rank and sampler inputs)."""
        return [self.split(batch) for batch in self.global_batches(epoch)]

    def split(self, batch: list[BatchItem]) -> list[MicroBatch]:
        """This process's `accumulation` micro-batches of a global batch (padded cyclically when it does not
        divide evenly), with each item's position in the padded global batch."""
        parts = self.world * self.accumulation
        per = -(-len(batch) // parts)
        micro = []
        for step in range(self.accumulation):
            start = (step * self.world + self.rank) * per
            positions = list(range(start, start + per))
            micro.append(MicroBatch([batch[g % len(batch)] for g in positions], positions))
        return micro

    def global_batches(self, epoch: int) -> list[list[BatchItem]]:
        """Every process's batches of `epoch` together (`global_batch` samples each)."""
        order_rng = np.random.default_rng(_derived_seed(self.seed, epoch, "order"))
        flip_rng = np.random.default_rng(_derived_seed(self.seed, epoch, "flip"))
        batches: list[list[BatchItem]] = []
        for indices in self._buckets.values():
            sequence: list[int] = []
            for _ in range(self.repeats):
                if self.shuffle:
                    sequence += [indices[i] for i in order_rng.permutation(len(indices))]
                else:
                    sequence += indices
            if self.random_flip:
                flips = (flip_rng.random(len(sequence)) < 0.5).tolist()
            else:
                flips = [False] * len(sequence)
            size = self.global_batch
            for start in range(0, len(sequence), size):
                chunk = list(zip(sequence[start : start + size], flips[start : start + size]))
                if len(chunk) < size and self.drop_incomplete:
                    continue
                batches.append(chunk)
        if self.shuffle:
            batches = [batches[i] for i in order_rng.permutation(len(batches))]
        return batches

    def next_step(self) -> tuple[int, list[MicroBatch]]:
        """The next (epoch, this process's micro-batches of one step), moving on to the next epoch after the last."""
        if self._position >= self.batches_per_epoch:
            self._epoch += 1
            self._position = 0
        if self._cached_epoch != self._epoch:
            self._cached_batches = self.epoch_batches(self._epoch)
            self._cached_epoch = self._epoch
        batch = self._cached_batches[self._position]
        self._position += 1
        return self._epoch, batch

    def next_batch(self) -> tuple[int, list[BatchItem]]:
        """The next (epoch, items) without accumulation: the step's only micro-batch."""
        if self.accumulation != 1:
            raise ValueError("next_batch takes whole steps of one micro-batch; use next_step with accumulation")
        epoch, (micro,) = self.next_step()
        return epoch, micro.items

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler is (the next batch is `position` of `epoch`) and what it was built from."""
        epoch, position = self._epoch, self._position
        if position >= self.batches_per_epoch:
            epoch, position = epoch + 1, 0
        return {
            "epoch": epoch,
            "position": position,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "settings": self._settings(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` left off; ValueError if the data or settings differ from it."""
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                "cannot resume the data order: the dataset's bucket layout changed since the checkpoint was "
                "saved (images added, removed, or assigned to other buckets, e.g. after changing data.path, "
                "data.resolution or the bucket options). Restore the dataset or start a new run."
            )
        if state.get("seed") != self.seed:
            raise ValueError(
                f"cannot resume the data order: the checkpoint used seed {state.get('seed')}, this run uses "
                f"{self.seed} (train.seed)."
            )
        saved_settings = state.get("settings")
        if saved_settings is not None:
            saved_settings = _saved_settings(saved_settings)
            changed = [
                f"{name} {saved_settings.get(name)!r} → {value!r}"
                for name, value in self._settings().items()
                if saved_settings.get(name) != value
            ]
            if changed:
                raise ValueError(f"cannot resume the data order: sampler settings changed ({'; '.join(changed)}).")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"invalid sampler state: epoch {epoch}, position {position}")
        self._epoch, self._position = epoch, position

    def _settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _SETTING_NAMES}


def _saved_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """Settings of a checkpoint written before they recorded the global batch (batch_size × world)."""
    if "global_batch" not in saved and "batch_size" in saved:
        saved = {**saved, "global_batch": int(saved["batch_size"]) * int(saved.get("world", 1))}
    return saved


def _derived_seed(seed: int, epoch: int, purpose: str) -> int:
    """A 64-bit seed from (seed, epoch, purpose); any ints, negatives included."""
    digest = hashlib.sha256(f"dittune-sampler\0{seed}\0{epoch}\0{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _layout_fingerprint(buckets: dict[Bucket, list[int]]) -> str:
    layout = [[*bucket, indices] for bucket, indices in sorted(buckets.items())]  # every dimension, frames included
    return hashlib.sha256(json.dumps(layout, separators=(",", ":")).encode()).hexdigest()
