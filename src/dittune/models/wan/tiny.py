"""Build a tiny, randomly initialised Wan text-to-video pipeline in diffusers layout, fully offline.

Real classes at tiny sizes: `WanTransformer3DModel` (2 blocks, 2 heads of 12 channels, 1×2×2 patches, 3-axis
RoPE), a 2-layer `UMT5EncoderModel` (relative attention in every layer, as umt5-xxl) with a locally trained
sentencepiece tokenizer, `AutoencoderKLWan` with per-channel `latents_mean` / `latents_std` in its config, and
`UniPCMultistepScheduler` in flow mode, as diffusers' conversion of the released checkpoints writes it.

Variants:
- "2.1": Wan 2.1 T2V (the 1.3B / 14B layout): the Wan 2.1 VAE (8× spatial, 4× temporal compression), flow
  shift 3.0 (the 480p setting).
- "2.2": Wan 2.2 TI2V-5B: the Wan 2.2 VAE (2×2 pixel unshuffle, then 8×: 16× spatial, 4× temporal, residual
  blocks), per-token timesteps (`expand_timesteps`), flow shift 5.0.
- "2.2-a14b": Wan 2.2 T2V-A14B: two experts of the same architecture (`transformer` for high noise,
  `transformer_2` for low noise, different random weights) switched at `boundary_ratio` 0.875, the Wan 2.1 VAE,
  flow shift 3.0 (as the released Wan2.2-T2V-A14B-Diffusers folder).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from dittune.models.tiny_parts import check_empty, save_pipeline, tiny_t5_encoder
from dittune.models.tiny_text import write_t5_tokenizer

VARIANTS = ("2.1", "2.2", "2.2-a14b")
LATENT_CHANNELS, TEXT_HIDDEN, TEXT_LENGTH = 4, 32, 512
FLOW_SHIFT = {"2.1": 3.0, "2.2": 5.0, "2.2-a14b": 3.0}
A14B_BOUNDARY = 0.875
"""Wan2.2-T2V-A14B's `boundary_ratio` (the I2V-A14B model switches at 0.9)."""


def latent_statistics(seed: int) -> tuple[list[float], list[float]]:
    """Non-trivial per-channel `latents_mean` / `latents_std` (the released VAEs keep theirs in config.json)."""
    generator = torch.Generator().manual_seed(seed)
    mean = (torch.randn(LATENT_CHANNELS, generator=generator) * 0.5).tolist()
    std = (0.5 + 2.0 * torch.rand(LATENT_CHANNELS, generator=generator)).tolist()
    return [round(v, 4) for v in mean], [round(v, 4) for v in std]


def tiny_vae(variant: str, seed: int):
    """`AutoencoderKLWan` with 8-channel blocks: the Wan 2.1 VAE, or the Wan 2.2 one (pixel unshuffle, ×16)."""
    from diffusers import AutoencoderKLWan

    mean, std = latent_statistics(seed)
    common = {
        "base_dim": 8,
        "z_dim": LATENT_CHANNELS,
        "dim_mult": [1, 1, 2, 2],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
        "latents_mean": mean,
        "latents_std": std,
    }
    if variant == "2.2":
        extra = {"is_residual": True, "in_channels": 12, "out_channels": 12, "patch_size": 2}
        return AutoencoderKLWan(**common, **extra, decoder_base_dim=8, scale_factor_spatial=16)
    return AutoencoderKLWan(**common)


def tiny_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # RoPE splits it 4 (time) + 4 (height) + 4 (width)
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        text_dim=TEXT_HIDDEN,
        freq_dim=32,
        ffn_dim=48,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )


def wan_scheduler(flow_shift: float):
    """The released models' scheduler: UniPC over flow-matching σ, shifted by `flow_shift`."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=flow_shift
    )


def build_tiny_wan(out_dir: str | Path, variant: str = "2.1", seed: int = 0) -> Path:
    """Write the pipeline folder and return its path. Deterministic for given arguments."""
    from diffusers import WanPipeline
    from transformers import AutoTokenizer

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    out = Path(out_dir)
    check_empty(out)
    sources = Path(tempfile.mkdtemp(prefix="dittune-tokenizers-"))
    try:
        write_t5_tokenizer(sources / "tokenizer", max_length=TEXT_LENGTH)
        tokenizer = AutoTokenizer.from_pretrained(sources / "tokenizer")
        torch.manual_seed(seed)
        pipeline = WanPipeline(
            tokenizer=tokenizer,
            text_encoder=tiny_t5_encoder(len(tokenizer), TEXT_HIDDEN, umt5=True),
            vae=tiny_vae(variant, seed),
            scheduler=wan_scheduler(FLOW_SHIFT[variant]),
            transformer=tiny_transformer(),
            transformer_2=tiny_transformer() if variant == "2.2-a14b" else None,
            boundary_ratio=A14B_BOUNDARY if variant == "2.2-a14b" else None,
            expand_timesteps=variant == "2.2",
        )
        layout = {
            "2.2": "TI2V-5B layout, ×16 VAE",
            "2.2-a14b": f"T2V-A14B layout: two experts switched at {A14B_BOUNDARY}, ×8 VAE",
        }.get(variant, "T2V layout, ×8 VAE")
        readme = (
            f"# Tiny Wan {variant} ({layout}), random weights\n\n"
            f"Built offline by `dittune tiny wan OUT --variant {variant} --seed {seed}`.\n"
            "Real architecture classes at tiny sizes (4k+1 frames); for tests and trying dittune, not for videos.\n"
        )
        return save_pipeline(pipeline, out, readme, {"tokenizer": sources / "tokenizer"})
    finally:
        shutil.rmtree(sources, ignore_errors=True)
