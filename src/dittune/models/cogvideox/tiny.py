"""Build a tiny, randomly initialised CogVideoX pipeline in diffusers layout, offline.

Real classes at tiny sizes, configured like the released checkpoints of each variant:

- "1.0": CogVideoX-2B-like. Sin-cos positional embeddings (no RoPE), VAE scaling 1.15258426, scheduler
  `snr_shift_scale` 3.0.
- "1.0-i2v": CogVideoX-5B-I2V-like. RoPE plus learned positional embeddings (so it trains and samples at
  its sample size only: 64×64, 9 frames), 2× latent input channels, VAE scaling 0.7, SNR shift 1.0.
- "1.5" / "1.5-i2v": CogVideoX1.5-5B(-I2V)-like. Temporal patch 2, no patch bias, RoPE, VAE scaling 0.7 with
  `invert_scale_latents`, SNR shift 1.0; the I2V variant adds the `ofs` embedding (as wide as the time
  embedding).

All use `CogVideoXDDIMScheduler` with the released settings (v-prediction, zero-terminal-SNR rescale,
"trailing" spacing) and a 2-layer T5 with a 226-token tokenizer.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from dittune.models.tiny_parts import check_empty, save_pipeline, tiny_t5_encoder
from dittune.models.tiny_text import write_t5_tokenizer

VARIANTS = ("1.0", "1.5", "1.0-i2v", "1.5-i2v")
LATENT_CHANNELS, T5_HIDDEN, TIME_EMBED = 4, 32, 32


def tiny_transformer_config(variant: str) -> dict[str, Any]:
    version, i2v = variant.removesuffix("-i2v"), variant.endswith("-i2v")
    v15 = version == "1.5"
    return {
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "in_channels": LATENT_CHANNELS * (2 if i2v else 1),
        "out_channels": LATENT_CHANNELS,
        "time_embed_dim": TIME_EMBED,
        "ofs_embed_dim": TIME_EMBED if v15 and i2v else None,
        "text_embed_dim": T5_HIDDEN,
        "num_layers": 2,
        # 1.5's sample size is only the RoPE grid's maximum (300×300 latents in the release): 128 px here.
        "sample_width": 16 if v15 else 8,
        "sample_height": 16 if v15 else 8,
        "sample_frames": 9,
        "patch_size": 2,
        "patch_size_t": 2 if v15 else None,
        "patch_bias": not v15,
        "max_text_seq_length": 226,
        "use_rotary_positional_embeddings": variant != "1.0",
        "use_learned_positional_embeddings": variant == "1.0-i2v",
    }


def tiny_vae(version: str):
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        sample_height=480,  # as released: tiling (cache.vae_tiling) starts above 240×360, never at test sizes
        sample_width=720,
        scaling_factor=1.15258426 if version == "1.0" else 0.7,
        invert_scale_latents=version == "1.5",
    )


def scheduler_config(variant: str) -> dict[str, Any]:
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": True,
        "snr_shift_scale": 3.0 if variant == "1.0" else 1.0,
    }


def build_tiny_cogvideox(out_dir: str | Path, variant: str = "1.0", seed: int = 0) -> Path:
    """Write the pipeline folder and return its path. Deterministic for given arguments."""
    import diffusers
    from transformers import T5Tokenizer

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    out = Path(out_dir)
    check_empty(out)
    version, i2v = variant.removesuffix("-i2v"), variant.endswith("-i2v")
    sources = Path(tempfile.mkdtemp(prefix="dittune-tokenizers-"))
    try:
        write_t5_tokenizer(sources / "tokenizer", max_length=226)
        tokenizer = T5Tokenizer.from_pretrained(sources / "tokenizer")
        torch.manual_seed(seed)
        cls = diffusers.CogVideoXImageToVideoPipeline if i2v else diffusers.CogVideoXPipeline
        pipeline = cls(
            tokenizer=tokenizer,
            text_encoder=tiny_t5_encoder(len(tokenizer), T5_HIDDEN),
            vae=tiny_vae(version),
            transformer=diffusers.CogVideoXTransformer3DModel(**tiny_transformer_config(variant)),
            scheduler=diffusers.CogVideoXDDIMScheduler(**scheduler_config(variant)),
        )
        readme = (
            f"# Tiny CogVideoX ({variant}-style), random weights\n\n"
            f"Built offline by `dittune tiny cogvideox OUT --variant {variant} --seed {seed}`.\n"
            "Real architecture classes at tiny sizes; for tests and trying dittune, not for videos.\n"
        )
        return save_pipeline(pipeline, out, readme, {"tokenizer": sources / "tokenizer"})
    finally:
        shutil.rmtree(sources, ignore_errors=True)
