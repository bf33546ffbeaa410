"""Build a tiny, randomly initialised HunyuanVideo (T2V) pipeline in diffusers layout, fully offline.

Real classes at tiny sizes: `HunyuanVideoTransformer3DModel` (one double-stream, one single-stream and
one refiner block, 2×2 patches, 3-axis RoPE, the guidance embedding as in the released model), a
3-layer `LlamaModel` (the pipeline reads the hidden states two layers below the top, so layer 1 of 3)
with a locally built Llama tokenizer that splits the prompt template like Llama 3 (see
`llama_tokenizer`), a `CLIPTextModel` (pooled output), a 4-block `AutoencoderKLHunyuanVideo`
(8× spatial, 4× temporal compression, the real scaling factor) and `FlowMatchEulerDiscreteScheduler`
with the released shift of 7.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from dittune.models.hunyuan_video.llama_tokenizer import write_llama_tokenizer
from dittune.models.tiny_parts import check_empty, save_pipeline, tiny_clip_text_encoder
from dittune.models.tiny_text import write_clip_tokenizer

VARIANTS = ("t2v",)
LLAMA_HIDDEN, CLIP_HIDDEN, LATENT_CHANNELS = 32, 32, 4
SCALING_FACTOR, SCHEDULER_SHIFT = 0.476986, 7.0


def tiny_transformer_config() -> dict:
    return {
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "num_layers": 1,
        "num_single_layers": 1,
        "num_refiner_layers": 1,
        "mlp_ratio": 4.0,  # as released: the original layout fuses q, k, v and the 4× MLP into linear1
        "patch_size": 2,
        "patch_size_t": 1,
        "guidance_embeds": True,
        "text_embed_dim": LLAMA_HIDDEN,
        "pooled_projection_dim": CLIP_HIDDEN,
        "rope_axes_dim": (4, 6, 6),  # sums to the head dim, as (16, 56, 56) does for 128
    }


def tiny_video_autoencoder():
    """`AutoencoderKLHunyuanVideo` with 4 blocks of 8 channels: 8× spatial, 4× temporal compression."""
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=SCALING_FACTOR,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )


def tiny_llama(tokenizer) -> torch.nn.Module:
    """A 3-layer `LlamaModel` with grouped-query attention, as Llama 3 has."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=LLAMA_HIDDEN,
        intermediate_size=2 * LLAMA_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaModel(config)


def build_tiny_hunyuan_video(out_dir: str | Path, variant: str = "t2v", seed: int = 0) -> Path:
    """Write the pipeline folder and return its path. Deterministic for given arguments."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import CLIPTokenizer, LlamaTokenizerFast

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    out = Path(out_dir)
    check_empty(out)
    sources = Path(tempfile.mkdtemp(prefix="dittune-tokenizers-"))
    try:
        write_llama_tokenizer(sources / "tokenizer", DEFAULT_PROMPT_TEMPLATE["template"])
        write_clip_tokenizer(sources / "tokenizer_2")
        tokenizer = LlamaTokenizerFast.from_pretrained(sources / "tokenizer")
        tokenizer_2 = CLIPTokenizer.from_pretrained(sources / "tokenizer_2")
        torch.manual_seed(seed)
        pipeline = HunyuanVideoPipeline(
            text_encoder=tiny_llama(tokenizer),
            tokenizer=tokenizer,
            transformer=HunyuanVideoTransformer3DModel(**tiny_transformer_config()),
            vae=tiny_video_autoencoder(),
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT),
            text_encoder_2=tiny_clip_text_encoder(tokenizer_2, CLIP_HIDDEN, CLIP_HIDDEN, with_projection=False),
            tokenizer_2=tokenizer_2,
        )
        readme = (
            "# Tiny HunyuanVideo (T2V), random weights\n\n"
            f"Built offline by `dittune tiny hunyuan-video OUT --variant {variant} --seed {seed}`.\n"
            "Real architecture classes at tiny sizes; for tests and trying dittune, not for videos.\n"
        )
        return save_pipeline(pipeline, out, readme, {"tokenizer_2": sources / "tokenizer_2"})
    finally:
        shutil.rmtree(sources, ignore_errors=True)
