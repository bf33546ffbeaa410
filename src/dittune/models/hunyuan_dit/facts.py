"""Hunyuan-DiT: the family's declarations that need no torch (see `dittune.models.facts`)."""

from __future__ import annotations

from pathlib import Path

from dittune.models.facts import DDPM_LOSS_OPTIONS, FamilyFacts, TextEncoderSlot
from dittune.models.hunyuan_dit import inspect as folder


class HunyuanDiTFacts(FamilyFacts):
    family = "hunyuan-dit"
    display_name = "Hunyuan-DiT"
    alignment = 16
    text_encoders = (
        TextEncoderSlot("clip", ("prompt_embeds", "prompt_attention_mask")),
        TextEncoderSlot("t5", ("prompt_embeds_2", "prompt_attention_mask_2")),
    )
    layout_module = "dittune.models.hunyuan_dit.layout"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    denoiser_component = "transformer"
    denoiser_class = "HunyuanDiT2DModel"
    pipeline_class = "HunyuanDiTPipeline"
    controlnet_class = "HunyuanDiT2DControlNetModel"
    controlnet_pipeline_class = "HunyuanDiTControlNetPipeline"
    loss_options = DDPM_LOSS_OPTIONS

    @classmethod
    def check_folder(cls, path: Path) -> list[str]:
        return folder.folder_problems(path)
