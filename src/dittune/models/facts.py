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
class FrameRule:
    """Clip lengths a video family accepts: ``multiple·k + 1`` frames (k ≥ 0), e.g. 4k+1 or 8k+1.

    `multiple` is the VAE's temporal compression (times the transformer's temporal patch where the
    pipeline needs whole patches). One frame (k = 0) is always valid: a still image is a 1-frame clip.
    """

    multiple: int

    def valid(self, frames: int) -> bool:
        if self.multiple == 0:
            return frames == 1
        return frames >= 1 and (frames - 1) % self.multiple == 0

    def snap_down(self, frames: int) -> int:
        """The longest valid length not above `frames` (at least 1)."""
        if self.multiple == 0:
            return 1
        return max(1, (frames - 1) // self.multiple * self.multiple + 1)

    @property
    def is_video(self) -> bool:
        return self.multiple > 0

    def __str__(self) -> str:
        return f"{self.multiple}k+1" if self.multiple else "1 (stills)"


STILL = FrameRule(multiple=0)
"""The rule of image families: one frame only (`valid` and `snap_down` accept 1 alone)."""


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

    frame_rule: ClassVar[FrameRule] = STILL
    """Clip lengths the family trains on; `STILL` (1 frame) for image families. A family whose rule depends
    on the model folder (e.g. a temporal patch) overrides `frame_rule_at`."""

    default_frames: ClassVar[int] = 49
    """`data.frames` when unset, for video families (snapped down to the rule)."""

    default_fps: ClassVar[float] = 24.0
    """Frame rate of written clips (and of frame-rate conditioning) when neither the data nor the config says."""

    text_encoders: ClassVar[tuple[TextEncoderSlot, ...]]
    default_lora_targets: ClassVar[tuple[str, ...]]
    denoiser_component: ClassVar[str] = "transformer"
    """Name of the trained component inside the family's diffusers pipeline (on a spec instance of a model with
    experts: the chosen expert's component)."""

    lora_key_prefix: ClassVar[str | None] = None
    """The key prefix of exported LoRA files when diffusers' loader of the family reads every adapter under one
    name, whichever component it goes into (Wan 2.2: "transformer", also for `transformer_2`); None: the component."""

    pipeline_class: ClassVar[str]
    """The family's stock diffusers pipeline class name (as in model_index.json)."""

    controlnet_class: ClassVar[str | None] = None
    """The diffusers ControlNet class `train.method = "controlnet"` trains (None: the family has none)."""

    controlnet_pipeline_class: ClassVar[str | None] = None
    """The stock pipeline that samples the denoiser with that ControlNet (validation)."""

    control_argument: ClassVar[str] = "controlnet_block_samples"
    """The denoiser's forward argument taking the ControlNet's residuals."""

    layout_module: ClassVar[str | None] = None
    """The module declaring the family's original checkpoint layout (`LAYOUT`, a `dittune.models.layout.Layout`, or
    None) and its foreign LoRA formats (`LORA_FORMATS`: format name → `LoraFormat`); None: diffusers names only."""

    @classmethod
    def _layout_declarations(cls) -> Any:
        import importlib

        return importlib.import_module(cls.layout_module) if cls.layout_module else None

    @classmethod
    def original_layout(cls) -> Any:
        """The `Layout` of the family's original (non-diffusers) checkpoints, or None."""
        module = cls._layout_declarations()
        return getattr(module, "LAYOUT", None) if module else None

    @classmethod
    def lora_formats(cls) -> dict[str, Any]:
        """Foreign LoRA format name (kohya, comfyui, official) → `LoraFormat`; diffusers is always available."""
        module = cls._layout_declarations()
        return dict(getattr(module, "LORA_FORMATS", {})) if module else {}

    denoiser_class: ClassVar[str]
    """The diffusers class of the trained component."""

    vae_class: ClassVar[str] = "AutoencoderKL"
    """The diffusers class of MODEL/vae (loaded frozen by the default `ModelSpec.load_vae`)."""

    loss_options: ClassVar[frozenset[str]] = frozenset()
    """The `loss.*` config keys this family's objective uses; setting any other is a preflight error."""

    t5_lengths: ClassVar[tuple[int, int] | None] = None
    """(default, maximum) tokens of the T5 encoder where `model.t5_max_length` may change them; None: fixed."""

    @classmethod
    def accepts_pipeline(cls, name: str | None) -> bool:
        """Whether a model folder whose model_index.json names pipeline `name` belongs to this family."""
        return name == cls.pipeline_class

    @classmethod
    def alignment_at(cls, path: Path) -> int:
        """The pixel alignment of the model in `path` (read from configs only; default: the class's)."""
        return cls.alignment

    @classmethod
    def fixed_size_at(cls, path: Path) -> tuple[int, int] | None:
        """(width, height) when the model in `path` only works at one size (e.g. learned positional
        embeddings); every sample is then planned into that one bucket. Default: None (any aligned size)."""
        return None

    @classmethod
    def default_frames_at(cls, path: Path) -> int:
        """`default_frames` of the model in `path` (read from configs only; default: the class's)."""
        return cls.default_frames

    @classmethod
    def default_fps_at(cls, path: Path) -> float:
        """`default_fps` of the model in `path` (read from configs only; default: the class's)."""
        return cls.default_fps

    @classmethod
    def image_conditioning_at(cls, path: Path) -> str:
        """Whether sampling the model in `path` takes a conditioning image: "none", "optional" (e.g. a T2V model
        also sampled image-to-video) or "required" (an image-to-video model). Read from configs only."""
        return "none"

    @classmethod
    def frame_rule_at(cls, path: Path) -> FrameRule:
        """The frame rule of the model in `path` (read from configs only; default: the class's)."""
        return cls.frame_rule

    @classmethod
    def experts_at(cls, path: Path) -> dict[str, str]:
        """Expert name → pipeline component, for a model in `path` whose denoising is split between several
        denoisers (e.g. by noise level); one is trained per run (`model.expert`). Default: {} (one denoiser)."""
        return {}

    @classmethod
    def expert_problem(cls, path: Path, expert: str | None) -> str | None:
        """What is wrong with `model.expert` for the model in `path` (read from configs only), or None."""
        experts = cls.experts_at(path)
        choices = ", ".join(f"{name!r} (trains {component})" for name, component in experts.items())
        if experts and expert is None:
            return (
                f"{path} has {len(experts)} denoiser experts and one is trained per run; "
                f"set model.expert to one of {choices}."
            )
        if expert is not None and not experts:
            return f"{cls.display_name} at {path} has a single denoiser; remove model.expert."
        if expert is not None and expert not in experts:
            return f"unknown expert {expert!r}; {path} has {choices}."
        return None

    @classmethod
    def check_folder(cls, path: Path) -> list[str]:
        """Problems with a model folder (missing files, wrong layout), before loading anything."""
        raise NotImplementedError(f"{cls.__name__} must check its model folder")
