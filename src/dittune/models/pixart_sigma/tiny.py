"""Build a tiny, randomly initialised PixArt-Sigma pipeline in diffusers layout, fully offline.

Real classes at tiny sizes: `PixArtTransformer2DModel` (adaLN-single, learned sigma: 8 output
channels), a `T5EncoderModel` with its sentencepiece tokenizer, a 4-block `AutoencoderKL` (4 latent
channels, SDXL's scaling factor) and the DPM-Solver++ scheduler of the released checkpoints (linear
betas 1e-4 → 0.02, epsilon prediction).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from dittune.models.tiny_parts import check_empty, save_pipeline, tiny_autoencoder, tiny_t5_encoder
from dittune.models.tiny_text import write_t5_tokenizer

VARIANTS = ("sigma", "sigma-microconditions")
T5_HIDDEN = 64


def tiny_transformer_config(variant: str) -> dict:
    micro = variant == "sigma-microconditions"
    heads = 3 if micro else 2  # the size embedding splits the width in three
    return {
        "num_attention_heads": heads,
        "attention_head_dim": 16,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 2,
        "cross_attention_dim": 16 * heads,
        "sample_size": 16,
        "patch_size": 2,
        "caption_channels": T5_HIDDEN,
        "norm_type": "ada_norm_single",
        "num_embeds_ada_norm": 1000,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "attention_bias": True,
        "interpolation_scale": None,
        "use_additional_conditions": micro,
    }


def build_tiny_pixart_sigma(out_dir: str | Path, variant: str = "sigma", seed: int = 0) -> Path:
    """Write the pipeline folder and return its path. Deterministic for given arguments.

    "sigma-microconditions" turns on the resolution/aspect-ratio embedding (as PixArt-α 1024 has),
    to exercise that path of the trainer.
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Tokenizer

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    out = Path(out_dir)
    check_empty(out)
    sources = Path(tempfile.mkdtemp(prefix="dittune-tokenizers-"))
    try:
        write_t5_tokenizer(sources / "tokenizer", max_length=300)
        tokenizer = T5Tokenizer.from_pretrained(sources / "tokenizer")
        torch.manual_seed(seed)
        pipeline = PixArtSigmaPipeline(
            tokenizer=tokenizer,
            text_encoder=tiny_t5_encoder(len(tokenizer), T5_HIDDEN),
            vae=tiny_autoencoder(latent_channels=4, scaling_factor=0.13025),
            transformer=PixArtTransformer2DModel(**tiny_transformer_config(variant)),
            scheduler=DPMSolverMultistepScheduler(
                beta_schedule="linear",
                beta_start=0.0001,
                beta_end=0.02,
                num_train_timesteps=1000,
                prediction_type="epsilon",
                algorithm_type="dpmsolver++",
                solver_order=2,
                lower_order_final=True,
                use_karras_sigmas=False,
                timestep_spacing="linspace",
                steps_offset=0,
            ),
        )
        readme = (
            f"# Tiny PixArt-Sigma ({variant}), random weights\n\n"
            f"Built offline by `dittune tiny pixart-sigma OUT --variant {variant} --seed {seed}`.\n"
            "Real architecture classes at tiny sizes; for tests and trying dittune, not for images.\n"
        )
        return save_pipeline(pipeline, out, readme, {"tokenizer": sources / "tokenizer"})
    finally:
        shutil.rmtree(sources, ignore_errors=True)
