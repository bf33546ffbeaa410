"""Building blocks of the offline tiny pipelines: real model classes at tiny sizes, random weights.

Every builder creates its components from the global torch RNG (seeded by the caller), writes the
pipeline with `save_pretrained` into a staging folder and renames it into place, so a folder either
is complete or does not exist.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def check_empty(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")


def save_pipeline(pipeline: Any, out: Path, readme: str, tokenizer_sources: dict[str, Path] | None = None) -> Path:
    """Write `pipeline` (safetensors) and a model card to `out` atomically.

    `tokenizer_sources` maps a tokenizer component to the folder it was built in; its vocabulary
    files (vocab.txt, spiece.model, vocab.json, merges.txt) are kept next to tokenizer.json, as in
    the real checkpoints, for tools that read them directly.
    """
    check_empty(out)
    staging = out.parent / f".{out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging, safe_serialization=True)
    for component, source in (tokenizer_sources or {}).items():
        for name in ("vocab.txt", "spiece.model", "vocab.json", "merges.txt"):
            if (source / name).is_file():
                shutil.copy(source / name, staging / component / name)
    (staging / "README.md").write_text(readme, encoding="utf-8")
    if out.exists():
        out.rmdir()
    staging.rename(out)
    return out


def tiny_autoencoder(
    channels: tuple[int, ...] = (32, 32, 32, 32),
    *,
    latent_channels: int = 4,
    norm_groups: int = 32,
    scaling_factor: float = 0.13025,
    shift_factor: float | None = None,
    quant_convs: bool = True,
):
    """An `AutoencoderKL` with len(channels) blocks (4 blocks: ×8), random weights.

    `quant_convs=False` drops the 1×1 convolutions around the latent, as Flux's VAE does.
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=norm_groups,
        sample_size=128,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
    )


def tiny_t5_encoder(vocab_size: int, hidden: int, umt5: bool = False):
    """A 2-layer `T5EncoderModel` (gated-GELU like T5 v1.1 / mT5), `hidden` wide; `umt5`: the same as a
    `UMT5EncoderModel` (its own relative attention bias in every layer, as Wan's text encoder)."""
    import transformers

    prefix = "UMT5" if umt5 else "T5"
    return getattr(transformers, f"{prefix}EncoderModel")(
        getattr(transformers, f"{prefix}Config")(
            vocab_size=vocab_size,
            d_model=hidden,
            d_kv=hidden // 4,
            d_ff=hidden + 5,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def tiny_clip_text_encoder(tokenizer: Any, hidden: int, projection_dim: int, *, with_projection: bool = True):
    """A 2-layer CLIP text encoder (`CLIPTextModelWithProjection` or `CLIPTextModel`) for `tokenizer`.

    Pooling follows the real checkpoints: the hidden state at the end-of-text token.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
