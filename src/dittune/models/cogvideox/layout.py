"""CogVideoX's LoRA naming: diffusers module names, the only names its LoRA tools use.

CogVideoX was released in two layouts: THUDM's SwissArmyTransformer (SAT) checkpoints and diffusers folders.
No LoRA tool writes SAT names, so dittune declares no SAT layout. The names that matter are diffusers':
- kijai's ComfyUI-CogVideoXWrapper (ComfyUI's CogVideoX nodes, `model_loading.py`) loads a LoRA with `lora_B`
  keys through diffusers' `CogVideoXLoraLoaderMixin.load_lora_weights`: dittune's own (diffusers) file, as is.
- It merges a LoRA without `lora_B` keys with `lora_utils.merge_lora`: the VideoX-Fun (CogVideoX-Fun) trainer's
  kohya-style file, `lora_unet_` + the diffusers module path with `.` → `_` (VideoX-Fun writes `lora_unet__`,
  an empty root name; the merge accepts either), `.lora_down/.lora_up/.alpha`, scale alpha / rank. That is the
  `kohya` format here.
- ComfyUI core had no CogVideoX model in 2025 (`comfy/lora.py` has no CogVideoX key map); a native port begun
  in 2026 (Comfy-Org/ComfyUI #13351, closed) names modules its own way (`blocks.{i}.q`, `attn_out`, `ff_proj`)
  and its LoRA key map is not published, so dittune writes no `diffusion_model.*` file for CogVideoX.

`LAYOUT` is therefore the identity over diffusers names (`to_theirs_state` changes nothing): its rules name
every linear layer a LoRA may target, so kohya names unflatten and a file's family can be told from its module
names. LTX-Video shares the block names (`transformer_blocks.{i}.attn1.to_q`), so a diffusers-named file
without dittune metadata that targets only those fits both families: `--family` decides (`dittune.load_lora`
takes the pipeline's).
"""

from __future__ import annotations

from dittune.models.layout import Layout, LoraFormat, Rename

B = "transformer_blocks.{i}."
_LINEARS = (
    *(B + f"attn1.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")),
    B + "ff.net.0.proj",
    B + "ff.net.2",
    B + "norm1.linear",
    B + "norm2.linear",
    "patch_embed.proj",  # a linear layer in 1.5 (temporal patches), a convolution in 1.0
    "patch_embed.text_proj",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
    "ofs_embedding.linear_1",  # 1.5 image-to-video
    "ofs_embedding.linear_2",
    "norm_out.linear",
    "proj_out",
)
DIFFUSERS_NAMES = Layout(
    name="diffusers", rules=tuple(Rename(name, name) for name in _LINEARS), prefixes=(), original=False
)

LORA_FORMATS = {
    "kohya": LoraFormat(
        "kohya",
        DIFFUSERS_NAMES,
        "VideoX-Fun (CogVideoX-Fun) trainer's lora_unet_ names over diffusers modules; kijai's "
        "ComfyUI-CogVideoXWrapper merges them (it loads the dittune file itself through diffusers)",
    ),
}
LAYOUT = DIFFUSERS_NAMES
