"""HunyuanVideo (T2V): the family's declarations that need no torch (see `dittune.models.facts`)."""

from __future__ import annotations

from pathlib import Path

from dittune.models.facts import FLOW_LOSS_OPTIONS, FamilyFacts, FrameRule, TextEncoderSlot
from dittune.models.folder import pipeline_folder_problems

COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class HunyuanVideoFacts(FamilyFacts):
    family = "hunyuan-video"
    display_name = "HunyuanVideo"
    alignment = 16
    """The VAE's 8× spatial compression times the transformer's 2×2 patches (the pipeline checks 16)."""
    frame_rule = FrameRule(4)
    """The VAE compresses time 4× after the first frame; the transformer's temporal patch is 1."""
    default_fps = 24.0
    text_encoders = (
        TextEncoderSlot("llama", ("llama_embeds", "llama_mask")),
        TextEncoderSlot("clip", ("clip_pooled",)),
    )
    default_lora_targets = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    )  # fmt: skip
    """Attention of the double-stream blocks (image and text projections) and of the single-stream blocks
    (q/k/v; their output projection is shared with the MLP). By suffix, the text token refiner's attention
    (`context_embedder.token_refiner.*.attn`) matches too, as in finetrainers' default."""
    layout_module = "dittune.models.hunyuan_video.layout"
    denoiser_component = "transformer"
    denoiser_class = "HunyuanVideoTransformer3DModel"
    vae_class = "AutoencoderKLHunyuanVideo"
    pipeline_class = "HunyuanVideoPipeline"
    loss_options = FLOW_LOSS_OPTIONS | {"guidance"}

    @classmethod
    def check_folder(cls, path: Path) -> list[str]:
        return pipeline_folder_problems(path, cls.pipeline_class, COMPONENTS)
