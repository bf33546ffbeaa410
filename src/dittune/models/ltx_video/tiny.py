"""Build a tiny, randomly initialised LTX-Video pipeline in diffusers layout, fully offline.

Real classes at tiny sizes: `AutoencoderKLLTXVideo` (8-channel blocks, 8 latent channels) with the real
model's geometry (4×4 pixel patches and three spatio-temporal downsamplings: ×32 in space, ×8 in time,
causal encoder) and non-trivial `latents_mean`/`latents_std` buffers; a 2-layer
`LTXVideoTransformer3DModel` (patch size 1); a `T5EncoderModel`; and `FlowMatchEulerDiscreteScheduler`
with LTX-Video's sequence-length-dependent shift (0.95 at 1024 latent tokens, 2.05 at 4096, terminal σ 0.1).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from dittune.models.tiny_parts import check_empty, save_pipeline, tiny_t5_encoder
from dittune.models.tiny_text import write_t5_tokenizer

VARIANTS = ("0.9",)
LATENT_CHANNELS, T5_HIDDEN = 8, 32
T5_LENGTH = 128


def tiny_vae():
    """An `AutoencoderKLLTXVideo` with LTX-Video 0.9's compression (×32 spatial, ×8 temporal)."""
    from diffusers import AutoencoderKLLTXVideo

    vae = AutoencoderKLLTXVideo(
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4,
        patch_size=4,
        patch_size_t=1,
        scaling_factor=1.0,
        encoder_causal=True,
        decoder_causal=False,
        timestep_conditioning=False,
    )
    with torch.no_grad():  # per-channel statistics live in the weights, as in the real checkpoint
        vae.latents_mean.copy_(torch.randn(LATENT_CHANNELS) * 0.1)
        vae.latents_std.copy_(0.5 + torch.rand(LATENT_CHANNELS))
        # A trained encoder is nearly deterministic (small posterior variance); a random one gives std ≈ 1, which
        # would drown an encoded image in its own sampling noise. The last output channel is the log-variance.
        vae.encoder.conv_out.conv.bias[-1] = -8.0
    return vae


def tiny_transformer():
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=T5_HIDDEN,
    )


def ltx_scheduler():
    """LTX-Video's scheduler settings (diffusers' conversion of the official checkpoint)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )


def build_tiny_ltx_video(out_dir: str | Path, variant: str = "0.9", seed: int = 0) -> Path:
    """Write the pipeline folder and return its path. Deterministic for given arguments."""
    from diffusers import LTXPipeline
    from transformers import T5Tokenizer

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    out = Path(out_dir)
    check_empty(out)
    sources = Path(tempfile.mkdtemp(prefix="dittune-tokenizers-"))
    try:
        write_t5_tokenizer(sources / "tokenizer", max_length=T5_LENGTH)
        tokenizer = T5Tokenizer.from_pretrained(sources / "tokenizer")
        torch.manual_seed(seed)
        pipeline = LTXPipeline(
            scheduler=ltx_scheduler(),
            vae=tiny_vae(),
            text_encoder=tiny_t5_encoder(len(tokenizer), T5_HIDDEN),
            tokenizer=tokenizer,
            transformer=tiny_transformer(),
        )
        readme = (
            f"# Tiny LTX-Video ({variant}-style), random weights\n\n"
            f"Built offline by `dittune tiny ltx-video OUT --variant {variant} --seed {seed}`.\n"
            "Real architecture classes at tiny sizes (×32 spatial, ×8 temporal VAE compression, 8k+1 frames); "
            "for tests and trying dittune, not for videos.\n"
        )
        return save_pipeline(pipeline, out, readme, {"tokenizer": sources / "tokenizer"})
    finally:
        shutil.rmtree(sources, ignore_errors=True)
