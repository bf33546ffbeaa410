"""Build a tiny, randomly initialised Hunyuan-DiT pipeline in diffusers layout, fully offline.

The architecture is the real one (HunyuanDiT2DModel, BertModel, T5EncoderModel, a 4-block
AutoencoderKL so the ×8 factor holds, DDPMScheduler with v-prediction); only the sizes are tiny.
Text lengths stay 77 / 256 because the transformer and the stock pipeline require them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from dittune.models.tiny_parts import check_empty, save_pipeline, tiny_autoencoder, tiny_t5_encoder
from dittune.models.tiny_text import write_bert_tokenizer, write_t5_tokenizer

BETA_END = {"v1.1": 0.03, "v1.2": 0.018}


def tiny_transformer_config(variant: str) -> dict:
    return {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": 4,
        "num_layers": 4,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "hidden_size": 32,
        "cross_attention_dim": 32,
        "cross_attention_dim_t5": 32,
        "pooled_projection_dim": 16,
        "text_len": 77,
        "text_len_t5": 256,
        "mlp_ratio": 2.0,
        "activation_fn": "gelu-approximate",
        "learn_sigma": True,
        "use_style_cond_and_image_meta_size": variant == "v1.1",
    }


def tiny_vae(channels: tuple[int, ...] = (32, 32, 32, 32), norm_groups: int = 32, scaling_factor: float = 0.13025):
    """A 4-block AutoencoderKL (×8, 4 latent channels) with random weights from the global RNG."""
    return tiny_autoencoder(channels, norm_groups=norm_groups, scaling_factor=scaling_factor)


def build_tiny_hunyuan_dit(
    out_dir: str | Path,
    variant: str = "v1.2",
    seed: int = 0,
    *,
    transformer_overrides: dict[str, Any] | None = None,
    text_hidden: int = 32,
    vae: Any = None,
    readme: str | None = None,
) -> Path:
    """Write the pipeline folder and return its path. Deterministic for given arguments.

    `transformer_overrides` changes entries of the tiny transformer config; `text_hidden` is the
    width of both text encoders (keep it equal to the transformer's cross-attention dims); `vae`
    replaces the random 4-block AutoencoderKL (e.g. one trained on the data); `readme` replaces the
    default model card.
    """
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel, BertTokenizer, T5Tokenizer

    if variant not in BETA_END:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(BETA_END)}")
    out = Path(out_dir)
    check_empty(out)
    sources = Path(tempfile.mkdtemp(prefix="dittune-tokenizers-"))
    write_bert_tokenizer(sources / "tokenizer")
    write_t5_tokenizer(sources / "tokenizer_2")
    tokenizer = BertTokenizer.from_pretrained(sources / "tokenizer")
    tokenizer_2 = T5Tokenizer.from_pretrained(sources / "tokenizer_2")

    torch.manual_seed(seed)
    text_encoder = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=text_hidden + 5,
            max_position_embeddings=512,
            type_vocab_size=2,
            pad_token_id=0,
        ),
        add_pooling_layer=False,
    )
    text_encoder_2 = tiny_t5_encoder(len(tokenizer_2), text_hidden)
    transformer = HunyuanDiT2DModel(**{**tiny_transformer_config(variant), **(transformer_overrides or {})})
    vae = vae if vae is not None else tiny_vae()
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=BETA_END[variant],
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        steps_offset=1,
        clip_sample=False,
        timestep_spacing="leading",
        variance_type="fixed_small",
    )
    pipeline = HunyuanDiTPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    readme = readme or (
        f"# Tiny Hunyuan-DiT ({variant}-style), random weights\n\n"
        f"Built offline by `dittune tiny hunyuan-dit OUT --variant {variant} --seed {seed}`.\n"
        "Real architecture classes at tiny sizes; for tests and trying dittune, not for images.\n"
    )
    try:
        return save_pipeline(
            pipeline, out, readme, {"tokenizer": sources / "tokenizer", "tokenizer_2": sources / "tokenizer_2"}
        )
    finally:
        shutil.rmtree(sources, ignore_errors=True)
