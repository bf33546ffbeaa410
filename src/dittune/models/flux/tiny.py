"""Build a tiny, randomly initialised Flux.1 pipeline in diffusers layout, fully offline.

Real classes at tiny sizes: `FluxTransformer2DModel` (one double-stream and one single-stream block,
packed 2×2 latents, 3-axis RoPE; the guidance embedding for "dev"), `CLIPTextModel` (pooled output)
and `T5EncoderModel`, a 4-block `AutoencoderKL` with 16 latent channels, Flux's scaling/shift factors
and no quant convs, and `FlowMatchEulerDiscreteScheduler` with resolution-dependent shifting.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from dittune.models.tiny_parts import (
    check_empty,
    save_pipeline,
    tiny_autoencoder,
    tiny_clip_text_encoder,
    tiny_t5_encoder,
)
from dittune.models.tiny_text import write_clip_tokenizer, write_t5_tokenizer

VARIANTS = ("dev", "schnell")
CLIP_HIDDEN, T5_HIDDEN = 32, 64
SCALING_FACTOR, SHIFT_FACTOR = 0.3611, 0.1159


def tiny_transformer_config(variant: str) -> dict:
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "joint_attention_dim": T5_HIDDEN,
        "pooled_projection_dim": CLIP_HIDDEN,
        "guidance_embeds": variant == "dev",
        "axes_dims_rope": (4, 6, 6),
    }


def build_tiny_flux(out_dir: str | Path, variant: str = "dev", seed: int = 0) -> Path:
    """Write the pipeline folder and return its path. Deterministic for given arguments."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5Tokenizer

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    out = Path(out_dir)
    check_empty(out)
    sources = Path(tempfile.mkdtemp(prefix="dittune-tokenizers-"))
    try:
        write_clip_tokenizer(sources / "tokenizer")
        write_t5_tokenizer(sources / "tokenizer_2", max_length=512 if variant == "dev" else 256)
        tokenizer = CLIPTokenizer.from_pretrained(sources / "tokenizer")
        tokenizer_2 = T5Tokenizer.from_pretrained(sources / "tokenizer_2")
        torch.manual_seed(seed)
        pipeline = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000,
                shift=3.0,
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=1.15,
                base_image_seq_len=256,
                max_image_seq_len=4096,
            ),
            vae=tiny_autoencoder(
                latent_channels=16, scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR, quant_convs=False
            ),
            text_encoder=tiny_clip_text_encoder(tokenizer, CLIP_HIDDEN, CLIP_HIDDEN, with_projection=False),
            tokenizer=tokenizer,
            text_encoder_2=tiny_t5_encoder(len(tokenizer_2), T5_HIDDEN),
            tokenizer_2=tokenizer_2,
            transformer=FluxTransformer2DModel(**tiny_transformer_config(variant)),
        )
        readme = (
            f"# Tiny Flux.1 ({variant}-style), random weights\n\n"
            f"Built offline by `dittune tiny flux OUT --variant {variant} --seed {seed}`.\n"
            "Real architecture classes at tiny sizes; for tests and trying dittune, not for images.\n"
        )
        return save_pipeline(
            pipeline, out, readme, {"tokenizer": sources / "tokenizer", "tokenizer_2": sources / "tokenizer_2"}
        )
    finally:
        shutil.rmtree(sources, ignore_errors=True)
