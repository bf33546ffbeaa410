"""Hunyuan-DiT's official checkpoint layout (Tencent's `hydit` code) and its LoRA formats.

The map follows diffusers' `scripts/convert_hunyuandit_to_diffusers.py` read the other way (the facts are in
docs/formats.md): fused `attn1.Wqkv` and `attn2.kv_proj`, `mlp.fc1/fc2`, `default_modulation.1`, the FFN and
cross-attention norms swapped (official `norm2` is diffusers' `norm3` and back), the final modulation's
(shift, scale) rows in the opposite order.
"""

from __future__ import annotations

from dittune.models.layout import Fuse, Key, Layout, LoraFormat, Rename

B = "blocks.{i}."
OFFICIAL = Layout(
    name="official",
    rules=(
        Fuse((B + "attn1.to_q", B + "attn1.to_k", B + "attn1.to_v"), B + "attn1.Wqkv"),
        Rename(B + "attn1.to_out.0", B + "attn1.out_proj"),
        Rename(B + "attn2.to_q", B + "attn2.q_proj"),
        Fuse((B + "attn2.to_k", B + "attn2.to_v"), B + "attn2.kv_proj"),
        Rename(B + "attn2.to_out.0", B + "attn2.out_proj"),
        Rename(B + "attn1.norm_q", B + "attn1.q_norm"),
        Rename(B + "attn1.norm_k", B + "attn1.k_norm"),
        Rename(B + "attn2.norm_q", B + "attn2.q_norm"),
        Rename(B + "attn2.norm_k", B + "attn2.k_norm"),
        Rename(B + "ff.net.0.proj", B + "mlp.fc1"),
        Rename(B + "ff.net.2", B + "mlp.fc2"),
        Rename(B + "norm1.linear", B + "default_modulation.1"),
        Rename(B + "norm1.norm", B + "norm1"),
        Rename(B + "norm2", B + "norm3"),
        Rename(B + "norm3", B + "norm2"),
        Rename(B + "skip_linear", B + "skip_linear"),
        Rename("text_embedder.linear_1", "mlp_t5.0"),
        Rename("text_embedder.linear_2", "mlp_t5.2"),
        Rename("time_extra_emb.pooler.q_proj", "pooler.q_proj"),
        Rename("time_extra_emb.pooler.k_proj", "pooler.k_proj"),
        Rename("time_extra_emb.pooler.v_proj", "pooler.v_proj"),
        Rename("time_extra_emb.pooler.c_proj", "pooler.c_proj"),
        Key("time_extra_emb.pooler.positional_embedding", "pooler.positional_embedding"),
        Rename("time_extra_emb.timestep_embedder.linear_1", "t_embedder.mlp.0"),
        Rename("time_extra_emb.timestep_embedder.linear_2", "t_embedder.mlp.2"),
        Rename("time_extra_emb.extra_embedder.linear_1", "extra_embedder.0"),
        Rename("time_extra_emb.extra_embedder.linear_2", "extra_embedder.2"),
        Rename("time_extra_emb.style_embedder", "style_embedder"),
        Rename("pos_embed.proj", "x_embedder.proj"),
        Rename("proj_out", "final_layer.linear"),
        Rename("norm_out.linear", "final_layer.adaLN_modulation.1", swap_halves=True),
    ),
    prefixes=("model.diffusion_model.", "diffusion_model.", "module."),
)

LORA_FORMATS = {
    "official": LoraFormat(
        "peft", OFFICIAL, "the official trainer's PEFT folder (Tencent's sample_t2i.py --lora-ckpt, lora/merge.py)"
    ),
    "kohya": LoraFormat("kohya", OFFICIAL, "Tencent's kohya_ss-hydit fork; ComfyUI and kohya's GUI read it"),
    "comfyui": LoraFormat("comfyui", OFFICIAL, "ComfyUI's generic diffusion_model.* names over official modules"),
}
LAYOUT = OFFICIAL
