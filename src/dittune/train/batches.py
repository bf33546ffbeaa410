"""Build training batches from the caches, with caption dropout decided per sample and text encoder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from dittune.cache.build import LATENT, TEXT
from dittune.cache.store import CacheStore
from dittune.models.base import SampleMeta, TrainBatch
from dittune.models.draws import Draws, as_draws
from dittune.models.facts import TextEncoderSlot
from dittune.train.prepare import EMPTY_PROMPT, PreparedData


def dropout_by_encoder(default: float, per_encoder: Mapping[str, float], slots: Sequence[TextEncoderSlot]) -> dict:
    """Caption-dropout probability of each text encoder: its own setting, else the common one."""
    return {slot.name: float(per_encoder.get(slot.name, default)) for slot in slots}


class CachedBatches:
    """Collates `(sample index, flipped)` items of one bucket into a `TrainBatch` on `device` (with the control
    images' moments when `prepared` has control keys)."""

    def __init__(
        self,
        store: CacheStore,
        prepared: PreparedData,
        slots: Sequence[TextEncoderSlot],
        dropout: Mapping[str, float],
        device: torch.device,
    ) -> None:
        self.store = store
        self.prepared = prepared
        self.slots = list(slots)
        self.dropout = {slot.name: float(dropout.get(slot.name, 0.0)) for slot in self.slots}
        self.device = device
        self.empty = self.load(TEXT, prepared.text_keys[EMPTY_PROMPT])

    def load(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        """A cache entry that prepare_data guaranteed; a clear error if it disappeared since."""
        entry = self.store.load(kind, key)
        if entry is None:
            raise RuntimeError(
                f"cache entry {kind}/{key} is damaged or missing (see the warning above) and was deleted, so nothing "
                "was trained on it; run again with --resume latest to re-encode it"
            )
        return entry

    def collate(self, items: Sequence[tuple[int, bool]], draws: Draws | torch.Generator) -> TrainBatch:
        """`draws` (CPU) decide caption dropout: one uniform number per sample and text encoder."""
        samples = self.prepared.plan.samples
        uniform = as_draws(draws).rand((len(items), len(self.slots)), device="cpu").tolist()
        moments: list[dict[str, torch.Tensor]] = []
        controls: list[dict[str, torch.Tensor]] = []
        control_keys = self.prepared.control_keys
        texts: list[dict[str, torch.Tensor]] = []
        meta: list[SampleMeta] = []
        for (index, flipped), numbers in zip(items, uniform):
            sample = samples[index]
            moments.append(self.load(LATENT, self.prepared.latent_keys[(sample.key, flipped)]))
            if control_keys:
                controls.append(self.load(LATENT, control_keys[(sample.key, flipped)]))
            text = dict(self.load(TEXT, self.prepared.text_keys[sample.record.caption]))
            for slot, number in zip(self.slots, numbers):
                if number < self.dropout[slot.name]:
                    text.update({key: self.empty[key] for key in slot.keys})
            texts.append(text)
            placement = sample.placement
            meta.append(
                SampleMeta(
                    original_size=(sample.record.width, sample.record.height),
                    target_size=placement.bucket,
                    crop_left_top=placement.crop_left_top,
                    flipped=flipped,
                    frames=placement.frames,
                    fps=placement.fps,
                )
            )
        control = self._stack(controls) if controls else None
        return TrainBatch(moments=self._stack(moments), text=self._stack(texts), meta=meta, control=control)

    def _stack(self, entries: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stacked on the CPU, then moved; to CUDA through pinned memory, so the copy does not wait for the GPU."""
        stacked = {key: torch.stack([e[key] for e in entries]) for key in entries[0]}
        if self.device.type != "cuda":
            return {key: value.to(self.device) for key, value in stacked.items()}
        return {key: value.pin_memory().to(self.device, non_blocking=True) for key, value in stacked.items()}
