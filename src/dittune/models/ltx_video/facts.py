"""LTX-Video: the family's declarations that need no torch (see `dittune.models.facts`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dittune.models.facts import FLOW_LOSS_OPTIONS, FamilyFacts, FrameRule, TextEncoderSlot
from dittune.models.folder import pipeline_folder_problems, read_json

COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")

PIPELINES = ("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline")
"""model_index.json classes of LTX-Video folders (same five components; dittune samples with the first two)."""


def vae_compression(vae_config: dict[str, Any]) -> tuple[int, int]:
    """(spatial, temporal) compression of an `AutoencoderKLLTXVideo` config, as the class computes it."""
    scaled = sum(bool(s) for s in vae_config.get("spatio_temporal_scaling", (True, True, True, False)))
    spatial = vae_config.get("spatial_compression_ratio") or int(vae_config.get("patch_size", 4)) * 2**scaled
    temporal = vae_config.get("temporal_compression_ratio") or int(vae_config.get("patch_size_t", 1)) * 2**scaled
    return int(spatial), int(temporal)


class LTXVideoFacts(FamilyFacts):
    family = "ltx-video"
    display_name = "LTX-Video"
    alignment = 32
    """VAE spatial compression (32) × transformer patch size (1)."""
    frame_rule = FrameRule(8)
    """8k+1 frames: the causal VAE's temporal compression (the first frame alone, then 8 per latent frame)."""
    default_frames = 49
    default_fps = 25.0
    text_encoders = (TextEncoderSlot("t5", ("t5_embeds", "t5_mask")),)
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    """Self- (attn1) and cross-attention (attn2) projections of every block."""
    denoiser_component = "transformer"
    denoiser_class = "LTXVideoTransformer3DModel"
    vae_class = "AutoencoderKLLTXVideo"
    pipeline_class = "LTXPipeline"
    layout_module = "dittune.models.ltx_video.layout"
    loss_options = FLOW_LOSS_OPTIONS | {"first_frame_p"}
    t5_lengths = (128, 256)
    """128 tokens as `LTXPipeline` (`max_sequence_length`); LTXConditionPipeline uses up to 256."""

    @classmethod
    def accepts_pipeline(cls, name: str | None) -> bool:
        return name in PIPELINES

    @classmethod
    def image_conditioning_at(cls, path: Path) -> str:
        return "optional"  # a text-to-video model, also sampled image-to-video by LTXImageToVideoPipeline

    @classmethod
    def frame_rule_at(cls, path: Path) -> FrameRule:
        config = Path(path) / "vae" / "config.json"
        if not config.is_file():
            return cls.frame_rule
        return FrameRule(vae_compression(read_json(config))[1])

    @classmethod
    def check_folder(cls, path: Path) -> list[str]:
        index = Path(path) / "model_index.json"
        declared = read_json(index).get("_class_name") if index.is_file() else None
        return pipeline_folder_problems(path, declared if declared in PIPELINES else cls.pipeline_class, COMPONENTS)
