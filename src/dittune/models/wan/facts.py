"""Wan 2.1 / 2.2 text-to-video: the family's declarations that need no torch (see `dittune.models.facts`).

Wan 2.2 A14B splits denoising between two experts of the same architecture: `transformer` (high noise) takes the
steps with timestep ≥ `boundary_ratio`·1000 (model_index.json; 0.875 for T2V-A14B), `transformer_2` (low noise)
the rest. One expert is trained per run (`model.expert`: "high_noise" or "low_noise")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dittune.models.facts import FLOW_LOSS_OPTIONS, FamilyFacts, FrameRule, TextEncoderSlot
from dittune.models.folder import pipeline_folder_problems, read_json

COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
TEXT_LENGTH = 512
"""UMT5 tokens per prompt: `WanPipeline.__call__`'s `max_sequence_length`."""
EXPERTS = {"high_noise": "transformer", "low_noise": "transformer_2"}
"""Wan 2.2 A14B's experts → their pipeline components (the pipeline's own names: `transformer` for the
high-noise stage, `transformer_2` for the low-noise one)."""


@dataclass(frozen=True)
class WanGeometry:
    """What a Wan folder's configs say about clip geometry (defaults: Wan 2.1, 480p)."""

    spatial: int = 8
    """VAE spatial compression (16 for the Wan 2.2 VAE, whose encoder also unshuffles 2×2 pixels)."""
    temporal: int = 4
    patch: int = 2
    """Transformer patch side (height and width)."""
    ti2v: bool = False
    """A Wan 2.2 TI2V-5B-style folder: the Wan 2.2 VAE and per-token timesteps (`expand_timesteps`)."""

    @property
    def alignment(self) -> int:
        return self.spatial * self.patch

    @property
    def frames(self) -> int:
        """The released models' clip length: 81 frames (Wan 2.1, 2.2 A14B) or 121 (TI2V-5B)."""
        return 121 if self.ti2v else 81

    @property
    def fps(self) -> float:
        return 24.0 if self.ti2v else 16.0

    @property
    def size(self) -> tuple[int, int]:
        """The native (width, height): 832×480 (Wan 2.1 480p) or 1280×704 (TI2V-5B's 720p)."""
        return (1280, 704) if self.ti2v else (832, 480)


def geometry_from_configs(vae: dict[str, Any], transformer: dict[str, Any], index: dict[str, Any]) -> WanGeometry:
    """The geometry of a Wan folder from its vae/transformer config.json and model_index.json."""
    patch = transformer.get("patch_size") or (1, 2, 2)
    return WanGeometry(
        spatial=int(vae.get("scale_factor_spatial") or 8),
        temporal=int(vae.get("scale_factor_temporal") or 4),
        patch=int(patch[1]),
        ti2v=bool(index.get("expand_timesteps")),
    )


def two_experts(index: dict[str, Any]) -> bool:
    """Whether model_index.json declares Wan 2.2 A14B's second (low-noise) expert or its switch boundary."""
    second = index.get("transformer_2")
    return index.get("boundary_ratio") is not None or (isinstance(second, list) and any(second))


def read_index(path: Path) -> dict[str, Any]:
    """MODEL/model_index.json, or {} where it is missing or unreadable (check_folder reports that)."""
    try:
        return read_json(Path(path) / "model_index.json")
    except (OSError, ValueError):
        return {}


class WanFacts(FamilyFacts):
    family = "wan"
    display_name = "Wan"
    alignment = 16
    """VAE spatial compression (8) × transformer patch (2) of Wan 2.1; a Wan 2.2 TI2V-5B folder needs 32 (its
    VAE compresses 16×), which `WanSpec` reads from the folder (`alignment_at`)."""
    frame_rule = FrameRule(4)
    """4k+1 frames: the causal VAE encodes the first frame alone, then 4 frames per latent frame."""
    default_frames = 81
    """Wan's own clip length (5 s at 16 fps): the pipeline's default `num_frames` and the released models'
    training and sampling length (a TI2V-5B folder: 121)."""
    default_fps = 16.0
    """The released models' frame rate (a TI2V-5B folder: 24); the pipeline has no frame-rate input."""
    text_encoders = (TextEncoderSlot("t5", ("t5_embeds",)),)
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    """Self- (attn1) and cross-attention (attn2) projections of every block."""
    denoiser_component = "transformer"
    denoiser_class = "WanTransformer3DModel"
    vae_class = "AutoencoderKLWan"
    pipeline_class = "WanPipeline"
    layout_module = "dittune.models.wan.layout"
    loss_options = FLOW_LOSS_OPTIONS
    lora_key_prefix = "transformer"
    """diffusers' `WanPipeline.load_lora_weights` reads `transformer.` keys for either expert and loads them into
    `transformer_2` when given `load_into_transformer_2=True`; a low-noise LoRA is written that way."""

    @classmethod
    def geometry_at(cls, path: Path) -> WanGeometry:
        """Clip geometry read from the folder's configs (Wan 2.1 defaults where a file is missing)."""
        path = Path(path)
        configs = [path / "vae" / "config.json", path / "transformer" / "config.json", path / "model_index.json"]
        vae, transformer, index = (read_json(file) if file.is_file() else {} for file in configs)
        return geometry_from_configs(vae, transformer, index)

    @classmethod
    def alignment_at(cls, path: Path) -> int:
        """Pixel alignment of the model in `path` (16, or 32 for a TI2V-5B folder)."""
        return cls.geometry_at(path).alignment

    @classmethod
    def frame_rule_at(cls, path: Path) -> FrameRule:
        return FrameRule(cls.geometry_at(path).temporal)

    @classmethod
    def default_frames_at(cls, path: Path) -> int:
        return cls.geometry_at(path).frames

    @classmethod
    def default_fps_at(cls, path: Path) -> float:
        return cls.geometry_at(path).fps

    @classmethod
    def experts_at(cls, path: Path) -> dict[str, str]:
        """{"high_noise": "transformer", "low_noise": "transformer_2"} for a Wan 2.2 A14B folder, else {}."""
        return dict(EXPERTS) if two_experts(read_index(path)) else {}

    @classmethod
    def boundary_at(cls, path: Path) -> float | None:
        """The σ (= timestep / 1000) where an A14B pipeline switches experts: `boundary_ratio`; None: one denoiser."""
        ratio = read_index(path).get("boundary_ratio")
        return float(ratio) if ratio is not None else None

    @classmethod
    def check_folder(cls, path: Path) -> list[str]:
        index = read_index(path)
        experts = two_experts(index)
        components = (*COMPONENTS, "transformer_2") if experts else COMPONENTS
        problems = pipeline_folder_problems(path, cls.pipeline_class, components)
        ratio, second = index.get("boundary_ratio"), index.get("transformer_2")
        if experts and not (isinstance(second, list) and any(second)):
            problems.append(
                f"{path}/model_index.json sets boundary_ratio but no transformer_2; a Wan 2.2 A14B folder needs "
                "both experts (transformer for high noise, transformer_2 for low noise)."
            )
        elif experts and not (isinstance(ratio, (int, float)) and 0.0 < ratio < 1.0):
            problems.append(
                f"{path}/model_index.json declares transformer_2 but boundary_ratio is {ratio!r}; a Wan 2.2 A14B "
                "folder switches experts at a boundary_ratio between 0 and 1 (0.875 for T2V-A14B)."
            )
        return problems
