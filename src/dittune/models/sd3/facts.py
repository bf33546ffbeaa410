"""SD3 / SD3.5: the family's declarations that need no torch (see `dittune.models.facts`)."""

from __future__ import annotations

from pathlib import Path

from dittune.models.facts import FLOW_LOSS_OPTIONS, FamilyFacts, TextEncoderSlot
from dittune.models.folder import pipeline_folder_problems

COMPONENTS = (
    "transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3",
    "tokenizer", "tokenizer_2", "tokenizer_3",
)  # fmt: skip


class SD3Facts(FamilyFacts):
    family = "sd3"
    display_name = "Stable Diffusion 3"
    alignment = 64
    text_encoders = (
        TextEncoderSlot("clip_l", ("clip_l_embeds", "clip_l_pooled")),
        TextEncoderSlot("clip_g", ("clip_g_embeds", "clip_g_pooled")),
        TextEncoderSlot("t5", ("t5_embeds",)),
    )
    default_lora_targets = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    )  # fmt: skip
    layout_module = "dittune.models.sd3.layout"
    denoiser_component = "transformer"
    denoiser_class = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"
    controlnet_class = "SD3ControlNetModel"
    controlnet_pipeline_class = "StableDiffusion3ControlNetPipeline"
    control_argument = "block_controlnet_hidden_states"
    loss_options = FLOW_LOSS_OPTIONS
    t5_lengths = (256, 512)

    @classmethod
    def check_folder(cls, path: Path) -> list[str]:
        return pipeline_folder_problems(path, cls.pipeline_class, COMPONENTS)
