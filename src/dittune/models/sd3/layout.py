"""SD3 / SD3.5's original (Stability AI, "SAI") checkpoint layout and its LoRA formats.

The map is diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` read the other way: each joint block
is an `x_block` (image stream) and a `context_block` (text stream) with fused `attn.qkv`, `attn.proj`,
`mlp.fc1/fc2` and `adaLN_modulation.1`; SD3.5 adds RMS qk-norm (`attn.ln_q/ln_k`) and, in SD3.5 Medium's
first blocks, a second image self-attention `attn2`. The last block's context stream is pre-only: no output
projection or MLP, and a 2-row-group modulation whose (shift, scale) rows are in the opposite order to
diffusers' (as in the final layer's); the other blocks' 6-group modulations keep their order.
"""

from __future__ import annotations

from dittune.models.layout import Fuse, Key, Layout, LoraFormat, Rename

D, X, C = "transformer_blocks.{i}.", "joint_blocks.{i}.x_block.", "joint_blocks.{i}.context_block."
SAI = Layout(
    name="sai",
    rules=(
        Key("pos_embed.pos_embed", "pos_embed"),
        Rename("pos_embed.proj", "x_embedder.proj"),
        Rename("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
        Rename("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
        Rename("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
        Rename("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
        Rename("context_embedder", "context_embedder"),
        Fuse((D + "attn.to_q", D + "attn.to_k", D + "attn.to_v"), X + "attn.qkv"),
        Rename(D + "attn.to_out.0", X + "attn.proj"),
        Rename(D + "attn.norm_q", X + "attn.ln_q"),
        Rename(D + "attn.norm_k", X + "attn.ln_k"),
        Fuse((D + "attn2.to_q", D + "attn2.to_k", D + "attn2.to_v"), X + "attn2.qkv"),
        Rename(D + "attn2.to_out.0", X + "attn2.proj"),
        Rename(D + "attn2.norm_q", X + "attn2.ln_q"),
        Rename(D + "attn2.norm_k", X + "attn2.ln_k"),
        Rename(D + "norm1.linear", X + "adaLN_modulation.1"),
        Rename(D + "ff.net.0.proj", X + "mlp.fc1"),
        Rename(D + "ff.net.2", X + "mlp.fc2"),
        Fuse((D + "attn.add_q_proj", D + "attn.add_k_proj", D + "attn.add_v_proj"), C + "attn.qkv"),
        Rename(D + "attn.to_add_out", C + "attn.proj"),
        Rename(D + "attn.norm_added_q", C + "attn.ln_q"),
        Rename(D + "attn.norm_added_k", C + "attn.ln_k"),
        Rename(D + "norm1_context.linear", C + "adaLN_modulation.1", swap_halves=True, swap_if_rows=2),
        Rename(D + "ff_context.net.0.proj", C + "mlp.fc1"),
        Rename(D + "ff_context.net.2", C + "mlp.fc2"),
        Rename("proj_out", "final_layer.linear"),
        Rename("norm_out.linear", "final_layer.adaLN_modulation.1", swap_halves=True),
    ),
    prefixes=("model.diffusion_model.", "diffusion_model."),
)

LORA_FORMATS = {
    "kohya": LoraFormat(
        "kohya", SAI, "sd-scripts' SD3/SD3.5 LoRAs (lora_unet_joint_blocks_*, fused qkv); ComfyUI and Forge read them"
    ),
    "comfyui": LoraFormat("comfyui", SAI, "ComfyUI's generic diffusion_model.* names over SAI modules"),
}
LAYOUT = SAI
