"""What a family declares without loading anything: names, geometry, text encoders, folder checks.

Torch-free, so `dittune config check` can run every check on a config without importing torch. Each
family's `facts.py` subclasses `FamilyFacts`; its `ModelSpec` subclasses that in turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

FLOW_LOSS_OPTIONS = frozenset({"timestep_sampling", "logit_mean", "logit_std", "mode_scale", "flow_shift", "weighting"})
"""The `loss.*` keys of rectified-flow objectives (models/flow_objective.py)."""

DDPM_LOSS_OPTIONS = frozenset({"vlb", "noise_offset", "min_snr_gamma"})
"""The `loss.*` keys of DDPM objectives with learned sigma (models/diffusion_objective.py)."""


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder and the keys of the text embedding it produces.

    Caption dropout is decided per slot: a dropped slot has its keys replaced by the
    empty-caption embedding's keys.
    """

    name: str
    keys: tuple[str, ...]


@dataclass
class ModelInfo:
    """What `ModelSpec.inspect` learns from a model folder without loading any weights."""

    family: str
    version: str
    path: Path
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class FamilyFacts:
    """The class-level declarations of a family (see `dittune.models.base.ModelSpec` for the rest)."""

    family: ClassVar[str]
    """The `model.family` config value."""

    display_name: ClassVar[str]
    alignment: ClassVar[int]
    """Image sides must be multiples of this many pixels (buckets snap to it)."""

    text_encoders: ClassVar[tuple[TextEncoderSlot, ...]]
    default_lora_targets: ClassVar[tuple[str, ...]]
    denoiser_component: ClassVar[str] = "transformer"
    """Name of the trained component inside the family's diffusers pipeline."""

    pipeline_class: ClassVar[str]
    """The family's stock diffusers pipeline class name (as in model_index.json)."""

    denoiser_class: ClassVar[str]
    """The diffusers class of the trained component."""

    loss_options: ClassVar[frozenset[str]] = frozenset()
    """The `loss.*` config keys this family's objective uses; setting any other is a preflight error."""

    t5_lengths: ClassVar[tuple[int, int] | None] = None
    """(default, maximum) tokens of the T5 encoder where `model.t5_max_length` may change them; None: fixed."""

    @classmethod
    def check_folder(cls, path: Path) -> list[str]:
        """Problems with a model folder (missing files, wrong layout), before loading anything."""
        raise NotImplementedError(f"{cls.__name__} must check its model folder")
