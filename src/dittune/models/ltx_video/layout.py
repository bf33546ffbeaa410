"""LTX-Video's original (Lightricks) checkpoint layout and its LoRA format.

The official checkpoints (`ltx-video-2b-v0.9*.safetensors`, `model.diffusion_model.` + module) and ComfyUI's
`LTXVModel` (`comfy/ldm/lightricks/model.py`) name four things differently from diffusers, the rest alike
(diffusers' `convert_ltx_transformer_checkpoint_to_diffusers` is these four renames and nothing else):
`patchify_proj` ↔ `proj_in`, `adaln_single` ↔ `time_embed`, `q_norm`/`k_norm` ↔ `norm_q`/`norm_k`. The
identity rules name every linear layer a LoRA may target, so the family is told from a file's module names.

diffusers' own importer of these files (`_convert_non_diffusers_ltxv_lora_to_diffusers`) only strips the
prefix: it refuses `.alpha` keys and would not rename the four modules, so it is no independent check here.

No kohya format: neither sd-scripts nor musubi-tuner trains LTX-Video (LTX-Video-Trainer, diffusion-pipe and
finetrainers write diffusers or ComfyUI names), so no `lora_unet_` files exist to read or to write for.
"""

from __future__ import annotations

from dittune.models.layout import Layout, LoraFormat, Rename

B = "transformer_blocks.{i}."
_SAME = (
    *(B + f"attn{n}.{m}" for n in (1, 2) for m in ("to_q", "to_k", "to_v", "to_out.0")),
    B + "ff.net.0.proj",
    B + "ff.net.2",
    "caption_projection.linear_1",
    "caption_projection.linear_2",
    "proj_out",
)
LIGHTRICKS = Layout(
    name="lightricks",
    rules=(
        Rename("proj_in", "patchify_proj"),
        Rename("time_embed.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_1"),
        Rename("time_embed.emb.timestep_embedder.linear_2", "adaln_single.emb.timestep_embedder.linear_2"),
        Rename("time_embed.linear", "adaln_single.linear"),
        *(Rename(B + f"attn{n}.norm_{x}", B + f"attn{n}.{x}_norm") for n in (1, 2) for x in ("q", "k")),
        *(Rename(name, name) for name in _SAME),
    ),
    prefixes=("model.diffusion_model.", "diffusion_model."),
)

LORA_FORMATS = {
    "comfyui": LoraFormat(
        "comfyui",
        LIGHTRICKS,
        "diffusion_model.* over Lightricks modules, as LTX-Video-Trainer exports for ComfyUI; ComfyUI's LoRA "
        "loader reads them (diffusers' LTX pipelines do not: they refuse .alpha keys; give them the dittune file)",
    ),
}
LAYOUT = LIGHTRICKS
