"""CogVideoX 1.0 / 1.5, text- and image-to-video: the family's declarations that need no torch.

The version and the kind of model are read from the folder's configs: CogVideoX 1.5 has a temporal
patch (`patch_size_t` = 2 in the transformer config), an image-to-video folder names
`CogVideoXImageToVideoPipeline` in its model_index.json (its transformer takes twice the latent channels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dittune.models.facts import FamilyFacts, FrameRule, TextEncoderSlot
from dittune.models.folder import pipeline_folder_problems, read_json

COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
T2V_PIPELINE = "CogVideoXPipeline"
I2V_PIPELINE = "CogVideoXImageToVideoPipeline"
TEXT_LENGTH = 226
"""T5 tokens of every CogVideoX model (the transformer's `max_text_seq_length`)."""
VAE_TEMPORAL = 4
VAE_SPATIAL = 8
SAMPLE_FPS = {"1.0": 8.0, "1.5": 16.0}
"""Frame rate of the official pipelines' exported clips: 49 frames at 8 fps (1.0), 81 at 16 fps (1.5)."""


def _transformer_config(path: Path) -> dict[str, Any]:
    return read_json(Path(path) / "transformer" / "config.json")


def version_at(path: Path) -> str:
    """ "1.5" when the transformer has a temporal patch, else "1.0"."""
    return "1.5" if _transformer_config(path).get("patch_size_t") else "1.0"


def declared_pipeline(path: Path) -> str | None:
    index = Path(path) / "model_index.json"
    return read_json(index).get("_class_name") if index.is_file() else None


def _frame_rule(path: Path) -> FrameRule:
    config = _transformer_config(path)
    temporal = int(config.get("temporal_compression_ratio") or VAE_TEMPORAL)
    return FrameRule(temporal * int(config.get("patch_size_t") or 1))


def _default_frames(path: Path) -> int:
    return _frame_rule(path).snap_down(int(_transformer_config(path).get("sample_frames") or 49))


def _default_fps(path: Path) -> float:
    return SAMPLE_FPS[version_at(path)]


class CogVideoXFacts(FamilyFacts):
    family = "cogvideox"
    display_name = "CogVideoX"
    alignment = 16
    """VAE ×8 times the 2×2 spatial patch."""
    text_encoders = (TextEncoderSlot("t5", ("t5_embeds",)),)
    default_lora_targets = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
    """The joint attention's projections, as diffusers' CogVideoX LoRA scripts target them."""
    denoiser_component = "transformer"
    denoiser_class = "CogVideoXTransformer3DModel"
    vae_class = "AutoencoderKLCogVideoX"
    pipeline_class = T2V_PIPELINE
    layout_module = "dittune.models.cogvideox.layout"
    loss_options = frozenset({"noise_offset", "min_snr_gamma"})
    t5_lengths = None
    frame_rule = FrameRule(VAE_TEMPORAL)
    default_frames = 49
    """On a spec instance: the transformer's `sample_frames` (49 for 1.0, 81 for 1.5), snapped to the rule."""
    default_fps = SAMPLE_FPS["1.0"]
    """On a spec instance: 8 for 1.0, 16 for 1.5. CogVideoX has no frame-rate input: this only sets written clips."""

    @classmethod
    def fixed_size_at(cls, path: Path) -> tuple[int, int] | None:
        """The 1.0 I2V model (5B-I2V) has learned positional embeddings for its sample size (720×480) only."""
        try:
            config = _transformer_config(path)
        except (OSError, ValueError):
            return None
        if not config.get("use_learned_positional_embeddings"):
            return None
        return int(config.get("sample_width", 90)) * VAE_SPATIAL, int(config.get("sample_height", 60)) * VAE_SPATIAL

    @classmethod
    def default_frames_at(cls, path: Path) -> int:
        try:
            return _default_frames(path)
        except (OSError, ValueError, KeyError):
            return cls.default_frames

    @classmethod
    def default_fps_at(cls, path: Path) -> float:
        try:
            return _default_fps(path)
        except (OSError, ValueError, KeyError):
            return cls.default_fps

    @classmethod
    def accepts_pipeline(cls, name: str | None) -> bool:
        return name in (T2V_PIPELINE, I2V_PIPELINE)

    @classmethod
    def image_conditioning_at(cls, path: Path) -> str:
        return "required" if declared_pipeline(path) == I2V_PIPELINE else "none"

    @classmethod
    def frame_rule_at(cls, path: Path) -> FrameRule:
        """4k+1 frames for 1.0; 8k+1 for 1.5 (VAE ×4 times the temporal patch of 2, as the official trainer
        requires; the pipelines pad the odd latent count by one frame)."""
        try:
            return _frame_rule(path)
        except (OSError, ValueError):
            return cls.frame_rule  # an unreadable folder is reported by check_folder

    @classmethod
    def check_folder(cls, path: Path) -> list[str]:
        path = Path(path)
        declared = declared_pipeline(path) if path.is_dir() else None
        return pipeline_folder_problems(path, declared if cls.accepts_pipeline(declared) else T2V_PIPELINE, COMPONENTS)
