"""Flux.1's original (Black Forest Labs) checkpoint layout and its LoRA formats.

The map is diffusers' single-file converter read the other way: fused `img_attn.qkv` / `txt_attn.qkv` in the
double blocks, `linear1` = q, k, v and the 4× MLP input in the single blocks, RMSNorm weights named `scale`,
the final modulation's (shift, scale) rows in the opposite order.
"""

from __future__ import annotations

from dittune.models.layout import Fuse, Layout, LoraFormat, Rename

D, DB = "transformer_blocks.{i}.", "double_blocks.{i}."
S, SB = "single_transformer_blocks.{i}.", "single_blocks.{i}."
SCALE = (("weight", "scale"),)
BFL = Layout(
    name="bfl",
    rules=(
        Rename("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        Rename("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        Rename("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        Rename("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        Rename("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        Rename("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
        Rename("context_embedder", "txt_in"),
        Rename("x_embedder", "img_in"),
        Rename(D + "norm1.linear", DB + "img_mod.lin"),
        Rename(D + "norm1_context.linear", DB + "txt_mod.lin"),
        Fuse((D + "attn.to_q", D + "attn.to_k", D + "attn.to_v"), DB + "img_attn.qkv"),
        Fuse((D + "attn.add_q_proj", D + "attn.add_k_proj", D + "attn.add_v_proj"), DB + "txt_attn.qkv"),
        Rename(D + "attn.norm_q", DB + "img_attn.norm.query_norm", SCALE),
        Rename(D + "attn.norm_k", DB + "img_attn.norm.key_norm", SCALE),
        Rename(D + "attn.norm_added_q", DB + "txt_attn.norm.query_norm", SCALE),
        Rename(D + "attn.norm_added_k", DB + "txt_attn.norm.key_norm", SCALE),
        Rename(D + "ff.net.0.proj", DB + "img_mlp.0"),
        Rename(D + "ff.net.2", DB + "img_mlp.2"),
        Rename(D + "ff_context.net.0.proj", DB + "txt_mlp.0"),
        Rename(D + "ff_context.net.2", DB + "txt_mlp.2"),
        Rename(D + "attn.to_out.0", DB + "img_attn.proj"),
        Rename(D + "attn.to_add_out", DB + "txt_attn.proj"),
        Rename(S + "norm.linear", SB + "modulation.lin"),
        Fuse((S + "attn.to_q", S + "attn.to_k", S + "attn.to_v", S + "proj_mlp"), SB + "linear1", ratios=(1, 1, 1, 4)),
        Rename(S + "attn.norm_q", SB + "norm.query_norm", SCALE),
        Rename(S + "attn.norm_k", SB + "norm.key_norm", SCALE),
        Rename(S + "proj_out", SB + "linear2"),
        Rename("proj_out", "final_layer.linear"),
        Rename("norm_out.linear", "final_layer.adaLN_modulation.1", swap_halves=True),
    ),
)

LORA_FORMATS = {
    "kohya": LoraFormat("kohya", BFL, "sd-scripts' Flux LoRAs (fused qkv); ComfyUI, Forge and diffusers read them"),
    "comfyui": LoraFormat("comfyui", BFL, "ComfyUI's diffusion_model.* names over BFL modules"),
}
LAYOUT = BFL
