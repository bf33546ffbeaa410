"""Wan's original (Wan-Video, Alibaba) checkpoint layout and its LoRA formats (Wan 2.1 and 2.2 alike).

The map is diffusers' `convert_wan_transformer_to_diffusers` read the other way (renames only, no fused or
reordered tensors): `self_attn`/`cross_attn` ↔ `attn1`/`attn2` with `q/k/v/o` ↔ `to_q/to_k/to_v/to_out.0`,
image-to-video `k_img/v_img/norm_k_img` ↔ `add_k_proj/add_v_proj/norm_added_k`, `ffn.0/ffn.2` ↔
`ffn.net.0.proj/ffn.net.2`, the cross-attention norm `norm3` ↔ diffusers' `norm2` (and the FFN norm `norm2` ↔
`norm3`), the per-block `modulation` ↔ `scale_shift_table`, `head.head/head.modulation` ↔ `proj_out` /
`scale_shift_table`, the embedders (`text_embedding.0/2`, `time_embedding.0/2`, `time_projection.1`,
image-to-video `img_emb.proj.0/1/3/4`) ↔ `condition_embedder.*`. ComfyUI's `comfy/ldm/wan/model.py` and
musubi-tuner use these module names.
"""

from __future__ import annotations

from dittune.models.layout import Key, Layout, LoraFormat, Rename

B = "blocks.{i}."
_ATTENTION = (
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "o"),
    ("norm_q", "norm_q"),
    ("norm_k", "norm_k"),
)
E = "condition_embedder."
ORIGINAL = Layout(
    name="wan",
    rules=(
        *(Rename(B + f"attn1.{ours}", B + f"self_attn.{theirs}") for ours, theirs in _ATTENTION),
        *(Rename(B + f"attn2.{ours}", B + f"cross_attn.{theirs}") for ours, theirs in _ATTENTION),
        Rename(B + "attn2.add_k_proj", B + "cross_attn.k_img"),
        Rename(B + "attn2.add_v_proj", B + "cross_attn.v_img"),
        Rename(B + "attn2.norm_added_k", B + "cross_attn.norm_k_img"),
        Rename(B + "ffn.net.0.proj", B + "ffn.0"),
        Rename(B + "ffn.net.2", B + "ffn.2"),
        Rename(B + "norm2", B + "norm3"),
        Rename(B + "norm3", B + "norm2"),
        Key(B + "scale_shift_table", B + "modulation"),
        Rename(E + "time_embedder.linear_1", "time_embedding.0"),
        Rename(E + "time_embedder.linear_2", "time_embedding.2"),
        Rename(E + "text_embedder.linear_1", "text_embedding.0"),
        Rename(E + "text_embedder.linear_2", "text_embedding.2"),
        Rename(E + "time_proj", "time_projection.1"),
        Rename(E + "image_embedder.norm1", "img_emb.proj.0"),
        Rename(E + "image_embedder.ff.net.0.proj", "img_emb.proj.1"),
        Rename(E + "image_embedder.ff.net.2", "img_emb.proj.3"),
        Rename(E + "image_embedder.norm2", "img_emb.proj.4"),
        Rename("proj_out", "head.head"),
        Key("scale_shift_table", "head.modulation"),
        Rename("patch_embedding", "patch_embedding"),
    ),
    prefixes=("model.diffusion_model.", "diffusion_model."),
)

LORA_FORMATS = {
    "kohya": LoraFormat(
        "kohya",
        ORIGINAL,
        "musubi-tuner's Wan LoRAs (lora_unet_blocks_0_self_attn_q); ComfyUI and diffusers' WanPipeline read them",
    ),
    "comfyui": LoraFormat(
        "comfyui",
        ORIGINAL,
        "diffusion_model.* over Wan modules (musubi's convert_lora.py --target other, diffusion-pipe); ComfyUI "
        "reads them, diffusers' WanPipeline too when only blocks are adapted (it refuses .alpha elsewhere)",
    ),
}
LAYOUT = ORIGINAL
