"""HunyuanVideo's original (Tencent) checkpoint layout and its LoRA formats.

The map is diffusers' `convert_hunyuan_video_transformer_to_diffusers` read the other way: the double-stream
blocks' fused `img_attn_qkv` / `txt_attn_qkv` (underscore names), `*_attn_proj`, `*_mlp.fc1/fc2` and
`*_mod.linear`; the single-stream blocks' `linear1` = q, k, v and the 4× MLP input, `linear2` and
`modulation.linear`; the text token refiner under `txt_in` (`individual_token_refiner.blocks.{i}` with fused
`self_attn_qkv`); the final modulation's (shift, scale) rows in the opposite order. The refiner's gate
modulation keeps its order.
"""

from __future__ import annotations

from dittune.models.layout import Fuse, Layout, LoraFormat, Rename

D, DB = "transformer_blocks.{i}.", "double_blocks.{i}."
S, SB = "single_transformer_blocks.{i}.", "single_blocks.{i}."
R, RB = "context_embedder.token_refiner.refiner_blocks.{i}.", "txt_in.individual_token_refiner.blocks.{i}."
TENCENT = Layout(
    name="tencent",
    rules=(
        Rename("x_embedder.proj", "img_in.proj"),
        Rename("time_text_embed.timestep_embedder.linear_1", "time_in.mlp.0"),
        Rename("time_text_embed.timestep_embedder.linear_2", "time_in.mlp.2"),
        Rename("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        Rename("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        Rename("time_text_embed.guidance_embedder.linear_1", "guidance_in.mlp.0"),
        Rename("time_text_embed.guidance_embedder.linear_2", "guidance_in.mlp.2"),
        Rename("context_embedder.proj_in", "txt_in.input_embedder"),
        Rename("context_embedder.time_text_embed.timestep_embedder.linear_1", "txt_in.t_embedder.mlp.0"),
        Rename("context_embedder.time_text_embed.timestep_embedder.linear_2", "txt_in.t_embedder.mlp.2"),
        Rename("context_embedder.time_text_embed.text_embedder.linear_1", "txt_in.c_embedder.linear_1"),
        Rename("context_embedder.time_text_embed.text_embedder.linear_2", "txt_in.c_embedder.linear_2"),
        Rename(R + "norm1", RB + "norm1"),
        Fuse((R + "attn.to_q", R + "attn.to_k", R + "attn.to_v"), RB + "self_attn_qkv"),
        Rename(R + "attn.to_out.0", RB + "self_attn_proj"),
        Rename(R + "norm2", RB + "norm2"),
        Rename(R + "ff.net.0.proj", RB + "mlp.fc1"),
        Rename(R + "ff.net.2", RB + "mlp.fc2"),
        Rename(R + "norm_out.linear", RB + "adaLN_modulation.1"),
        Rename(D + "norm1.linear", DB + "img_mod.linear"),
        Rename(D + "norm1_context.linear", DB + "txt_mod.linear"),
        Fuse((D + "attn.to_q", D + "attn.to_k", D + "attn.to_v"), DB + "img_attn_qkv"),
        Fuse((D + "attn.add_q_proj", D + "attn.add_k_proj", D + "attn.add_v_proj"), DB + "txt_attn_qkv"),
        Rename(D + "attn.norm_q", DB + "img_attn_q_norm"),
        Rename(D + "attn.norm_k", DB + "img_attn_k_norm"),
        Rename(D + "attn.norm_added_q", DB + "txt_attn_q_norm"),
        Rename(D + "attn.norm_added_k", DB + "txt_attn_k_norm"),
        Rename(D + "attn.to_out.0", DB + "img_attn_proj"),
        Rename(D + "attn.to_add_out", DB + "txt_attn_proj"),
        Rename(D + "ff.net.0.proj", DB + "img_mlp.fc1"),
        Rename(D + "ff.net.2", DB + "img_mlp.fc2"),
        Rename(D + "ff_context.net.0.proj", DB + "txt_mlp.fc1"),
        Rename(D + "ff_context.net.2", DB + "txt_mlp.fc2"),
        Fuse((S + "attn.to_q", S + "attn.to_k", S + "attn.to_v", S + "proj_mlp"), SB + "linear1", ratios=(1, 1, 1, 4)),
        Rename(S + "attn.norm_q", SB + "q_norm"),
        Rename(S + "attn.norm_k", SB + "k_norm"),
        Rename(S + "norm.linear", SB + "modulation.linear"),
        Rename(S + "proj_out", SB + "linear2"),
        Rename("proj_out", "final_layer.linear"),
        Rename("norm_out.linear", "final_layer.adaLN_modulation.1", swap_halves=True),
    ),
    prefixes=("model.diffusion_model.", "diffusion_model."),
)

LORA_FORMATS = {
    "kohya": LoraFormat(
        "kohya", TENCENT, "musubi-tuner's default HunyuanVideo LoRAs (lora_unet_double_blocks_*); ComfyUI reads them"
    ),
    "comfyui": LoraFormat(
        "comfyui",
        TENCENT,
        "ComfyUI's diffusion_model.* names over Tencent modules, as musubi's --target other spells them but with"
        " .alpha (which diffusers' HunyuanVideo importer refuses)",
    ),
}
LAYOUT = TENCENT
