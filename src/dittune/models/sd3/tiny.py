"""Build a tiny, randomly initialised Stable Diffusion 3 / 3.5 pipeline in diffusers layout, offline.

Real classes at tiny sizes: `SD3Transformer2DModel` (MMDiT), two `CLIPTextModelWithProjection`
(CLIP-L-like and OpenCLIP-bigG-like, of different widths so the concatenation and padding to the T5
width are exercised), a `T5EncoderModel`, a 4-block `AutoencoderKL` with 16 latent channels and
SD3's scaling/shift factors, and `FlowMatchEulerDiscreteScheduler` with shift 3.
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

VARIANTS = ("sd3.5", "sd3", "sd3.5-medium")
CLIP_L_HIDDEN, CLIP_G_HIDDEN, T5_HIDDEN = 24, 32, 64
SCALING_FACTOR, SHIFT_FACTOR = 1.5305, 0.0609


def tiny_transformer_config(variant: str) -> dict:
    return {
        "sample_size": 32,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "joint_attention_dim": T5_HIDDEN,
        "caption_projection_dim": 64,
        "pooled_projection_dim": CLIP_L_HIDDEN + CLIP_G_HIDDEN,
        "out_channels": 16,
        "pos_embed_max_size": 64,
        "qk_norm": None if variant == "sd3" else "rms_norm",
        "dual_attention_layers": (0,) if variant == "sd3.5-medium" else (),
    }


def build_tiny_sd3(out_dir: str | Path, variant: str = "sd3.5", seed: int = 0) -> Path:
    """Write the pipeline folder and return its path. Deterministic for given arguments."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5Tokenizer

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    out = Path(out_dir)
    check_empty(out)
    sources = Path(tempfile.mkdtemp(prefix="dittune-tokenizers-"))
    try:
        write_clip_tokenizer(sources / "tokenizer")
        write_clip_tokenizer(sources / "tokenizer_2", pad_token="!")
        write_t5_tokenizer(sources / "tokenizer_3")
        tokenizer = CLIPTokenizer.from_pretrained(sources / "tokenizer")
        tokenizer_2 = CLIPTokenizer.from_pretrained(sources / "tokenizer_2")
        tokenizer_3 = T5Tokenizer.from_pretrained(sources / "tokenizer_3")

        torch.manual_seed(seed)
        pipeline = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**tiny_transformer_config(variant)),
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=tiny_autoencoder(latent_channels=16, scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR),
            text_encoder=tiny_clip_text_encoder(tokenizer, CLIP_L_HIDDEN, CLIP_L_HIDDEN),
            tokenizer=tokenizer,
            text_encoder_2=tiny_clip_text_encoder(tokenizer_2, CLIP_G_HIDDEN, CLIP_G_HIDDEN),
            tokenizer_2=tokenizer_2,
            text_encoder_3=tiny_t5_encoder(len(tokenizer_3), T5_HIDDEN),
            tokenizer_3=tokenizer_3,
        )
        readme = (
            f"# Tiny Stable Diffusion 3 ({variant}-style), random weights\n\n"
            f"Built offline by `dittune tiny sd3 OUT --variant {variant} --seed {seed}`.\n"
            "Real architecture classes at tiny sizes; for tests and trying dittune, not for images.\n"
        )
        tokenizers = {name: sources / name for name in ("tokenizer", "tokenizer_2", "tokenizer_3")}
        return save_pipeline(pipeline, out, readme, tokenizers)
    finally:
        shutil.rmtree(sources, ignore_errors=True)
