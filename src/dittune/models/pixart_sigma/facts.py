"""PixArt-Sigma: the family's declarations that need no torch (see `dittune.models.facts`)."""

from __future__ import annotations

from pathlib import Path

from dittune.models.facts import DDPM_LOSS_OPTIONS, FamilyFacts, TextEncoderSlot
from dittune.models.folder import pipeline_folder_problems

COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")


class PixArtSigmaFacts(FamilyFacts):
    family = "pixart-sigma"
    display_name = "PixArt-Sigma"
    alignment = 16
    text_encoders = (TextEncoderSlot("t5", ("prompt_embeds", "prompt_attention_mask")),)
    default_lora_targets = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                            "attn2.to_v", "attn2.to_out.0")  # fmt: skip
    denoiser_component = "transformer"
    denoiser_class = "PixArtTransformer2DModel"
    pipeline_class = "PixArtSigmaPipeline"
    loss_options = DDPM_LOSS_OPTIONS
    t5_lengths = (300, 512)

    @classmethod
    def check_folder(cls, path: Path) -> list[str]:
        return pipeline_folder_problems(path, cls.pipeline_class, COMPONENTS)
