"""Flux.1: the family's declarations that need no torch (see `dittune.models.facts`)."""

from __future__ import annotations

from pathlib import Path

from dittune.models.facts import FLOW_LOSS_OPTIONS, FamilyFacts, TextEncoderSlot
from dittune.models.folder import pipeline_folder_problems

COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class FluxFacts(FamilyFacts):
    family = "flux"
    display_name = "Flux.1"
    alignment = 16
    text_encoders = (TextEncoderSlot("clip", ("clip_pooled",)), TextEncoderSlot("t5", ("t5_embeds",)))
    layout_module = "dittune.models.flux.layout"
    default_lora_targets = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )  # fmt: skip
    """As diffusers' Flux LoRA script: attention of both block kinds plus the double blocks' MLPs."""
    denoiser_component = "transformer"
    denoiser_class = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"
    loss_options = FLOW_LOSS_OPTIONS | {"guidance"}
    t5_lengths = (512, 512)

    @classmethod
    def check_folder(cls, path: Path) -> list[str]:
        return pipeline_folder_problems(path, cls.pipeline_class, COMPONENTS)
