"""Foreign LoRA containers, family-free: how kohya, ComfyUI and PEFT files name and store adapter tensors.

- `kohya`: `lora_unet_<module with . → _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (sd-scripts,
  musubi-tuner, and what ComfyUI, Forge and A1111 read everywhere).
- `comfyui`: `diffusion_model.<module>.lora_A.weight` / `.lora_B.weight` / `.alpha` (ComfyUI's generic key
  map, musubi's `--target other`).
- `peft`: a folder with `adapter_config.json` (r, lora_alpha, rank_pattern, alpha_pattern) and
  `adapter_model.safetensors` keyed `base_model.model.<module>.lora_A.weight` (what `PeftModel.save_pretrained`
  writes; the official Hunyuan-DiT trainer's format).
- `diffusers`: `<component>.<module>.lora_A.weight` (dittune's own files, `dittune.export.lora_file`, and the
  diffusers example scripts'); without dittune's metadata, alpha comes from `lora_adapter_metadata`, else
  equals the rank.

Which module names a file uses (the diffusers model's or an original checkpoint's) is the family's business
(`dittune.models.layout`). Alpha is always written; when a file has none, the scale is 1 (alpha = rank), as
ComfyUI, sd-scripts and diffusers assume. The `dittune_source` metadata says what produced a file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from dittune.models.layout_convert import LoraModule
from dittune.safetensors_bytes import write_safetensors

NAMINGS = ("kohya", "comfyui", "peft")
KOHYA_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."
PEFT_PREFIX = "base_model.model."
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SOURCE_KEY = "dittune_source"

# (down suffix, up suffix) spellings seen in the wild; the first of each naming is the one written
_SUFFIXES = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_A.default.weight", ".lora_B.default.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)
_OTHER_COMPONENTS = ("lora_te", "text_encoder")


@dataclass
class LoraTensors:
    """A LoRA file read without knowing its family: module name (as the file spells it, kohya names still
    flattened) → adapter; `prefix` is the key prefix shared by the modules (e.g. `transformer.`)."""

    naming: str
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    prefix: str = ""
    ignored: list[str] = field(default_factory=list)
    """Keys left out: other components' adapters (text encoders) and tensors no adapter explains."""

    @property
    def source(self) -> dict:
        """The `dittune_source` metadata (what produced the file), or {}."""
        return json.loads(self.metadata.get(SOURCE_KEY, "{}"))


def detect_naming(keys: list[str]) -> str:
    """The naming of a file's tensor keys: kohya, comfyui, peft or diffusers."""
    denoiser = [k for k in keys if not k.startswith(_OTHER_COMPONENTS)]
    if any(k.startswith(KOHYA_PREFIX) for k in denoiser):
        return "kohya"
    if any(k.startswith(COMFY_PREFIX) for k in denoiser):
        return "comfyui"
    if any(k.startswith(PEFT_PREFIX) for k in denoiser):
        return "peft"
    if any(k.endswith(suffix) for k in denoiser for pair in _SUFFIXES for suffix in pair):
        return "diffusers"
    raise ValueError("no LoRA tensors found (keys such as '….lora_down.weight' or '….lora_A.weight')")


def read_tensors(path: Path) -> LoraTensors:
    """Any LoRA file or PEFT folder, tensors grouped into adapters per module."""
    path = Path(path)
    config: dict = {}
    if path.is_dir():
        if not (path / PEFT_CONFIG).is_file() or not (path / PEFT_WEIGHTS).is_file():
            raise FileNotFoundError(f"{path} is a folder without {PEFT_CONFIG} and {PEFT_WEIGHTS} (a PEFT adapter)")
        config = json.loads((path / PEFT_CONFIG).read_text())
        path = path / PEFT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: dittune reads LoRAs from .safetensors files (or PEFT folders)")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    # VideoX-Fun writes `lora_unet__transformer_blocks_…`; ComfyUI reads it as `lora_unet_…`, and so does dittune
    tensors = {
        KOHYA_PREFIX + k[len(KOHYA_PREFIX) + 1 :] if k.startswith(KOHYA_PREFIX + "_") else k: v
        for k, v in tensors.items()
    }
    naming = detect_naming(list(tensors))
    return _group(tensors, naming, metadata, config)


def _group(tensors: dict[str, torch.Tensor], naming: str, metadata: dict[str, str], config: dict) -> LoraTensors:
    prefix = {"kohya": KOHYA_PREFIX, "comfyui": COMFY_PREFIX, "peft": PEFT_PREFIX}.get(naming, "")
    ignored = [k for k in tensors if not k.startswith(prefix) or k.startswith(_OTHER_COMPONENTS)]
    wanted = {k: v for k, v in tensors.items() if k not in ignored}
    if naming == "diffusers":
        prefix = _common_component(wanted)
    modules: dict[str, LoraModule] = {}
    used: set[str] = set()
    alphas = _peft_alphas(config, metadata, prefix)
    for key in wanted:
        for down_suffix, up_suffix in _SUFFIXES:
            if not key.endswith(down_suffix):
                continue
            base = key[: -len(down_suffix)]
            up_key = base + up_suffix
            if up_key not in wanted:
                raise ValueError(f"{key} has no matching {up_key}")
            down, up = wanted[key], wanted[up_key]
            name = base[len(prefix) :]
            alpha_key = base + ".alpha"
            if alpha_key in wanted:
                alpha = float(wanted[alpha_key].float().item())
                used.add(alpha_key)
            else:
                alpha = alphas(name, down.shape[0])
            modules[name] = LoraModule(down, up, alpha)
            used.update({key, up_key})
    unexplained = [k for k in wanted if k not in used]
    if unexplained:
        kinds = sorted({k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1] for k in unexplained})
        raise ValueError(
            f"{len(unexplained)} tensors are not plain LoRA (e.g. {unexplained[0]}; kinds: {', '.join(kinds[:5])}): "
            "DoRA, LoCon/LyCORIS or full-weight differences are not supported; export a plain LoRA"
        )
    if not modules:
        raise ValueError("no denoiser LoRA tensors found (only other components' or unknown keys)")
    return LoraTensors(naming, modules, metadata, prefix, ignored)


def _common_component(tensors: dict[str, torch.Tensor]) -> str:
    firsts = {k.split(".", 1)[0] for k in tensors}
    if len(firsts) == 1 and not next(iter(firsts)).isdigit():
        only = next(iter(firsts))
        if only.startswith("transformer") or only in ("unet", "denoiser"):
            return only + "."
    return ""


def _peft_alphas(config: dict, metadata: dict[str, str], prefix: str):
    """name, rank → alpha from a PEFT config or diffusers' `lora_adapter_metadata` (else alpha = rank)."""
    if not config and "lora_adapter_metadata" in metadata:
        raw = json.loads(metadata["lora_adapter_metadata"])
        config = {k.removeprefix(prefix): v for k, v in raw.items()}
    default = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))  # peft's rank-stabilised scale alpha / √r, kept as alpha' / r

    def alpha(name: str, rank: int) -> float:
        value = next((v for p, v in patterns.items() if name == p or name.endswith("." + p)), default)
        if value is None:
            return float(rank)
        return float(value) * rank**0.5 if rslora else float(value)

    return alpha


def write_tensors(
    path: Path, modules: dict[str, LoraModule], naming: str, source: dict, extra_metadata: dict[str, str] | None = None
) -> Path:
    """Write adapters (module names as the target layout spells them, dotted) in `naming`, atomically. A
    `peft` adapter is a folder; the others are one .safetensors file. Alpha is always written."""
    if naming not in NAMINGS:
        raise ValueError(f"unknown LoRA naming {naming!r}; use one of {', '.join(NAMINGS)}")
    metadata = {"format": "pt", SOURCE_KEY: json.dumps(source, sort_keys=True), **(extra_metadata or {})}
    tensors: dict[str, torch.Tensor] = {}
    for name, module in sorted(modules.items()):
        if naming == "kohya":
            base = KOHYA_PREFIX + name.replace(".", "_")
            tensors[base + ".lora_down.weight"] = module.down
            tensors[base + ".lora_up.weight"] = module.up
            tensors[base + ".alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
        else:
            base = (COMFY_PREFIX if naming == "comfyui" else PEFT_PREFIX) + name
            tensors[base + ".lora_A.weight"] = module.down
            tensors[base + ".lora_B.weight"] = module.up
            if naming == "comfyui":
                tensors[base + ".alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if naming != "peft":
        return _atomic_save(path, tensors, metadata)
    path.mkdir(exist_ok=True)
    _atomic_save(path / PEFT_WEIGHTS, tensors, metadata)
    tmp = path / f".{PEFT_CONFIG}.tmp"
    tmp.write_text(json.dumps(peft_config(modules, source), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / PEFT_CONFIG)
    return path


def peft_config(modules: dict[str, LoraModule], source: dict) -> dict:
    """adapter_config.json: the most common rank and alpha, patterns for the modules that differ."""
    ranks = [m.rank for m in modules.values()]
    rank = max(set(ranks), key=ranks.count)
    alphas = [m.alpha for m in modules.values() if m.rank == rank]
    alpha = max(set(alphas), key=alphas.count)
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {name: m.rank for name, m in modules.items() if m.rank != rank},
        "alpha_pattern": {name: m.alpha for name, m in modules.items() if m.alpha != alpha or m.rank != rank},
        # the exact modules, as a regex peft full-matches (a list of name endings such as "0" would match whole blocks)
        "target_modules": "^(?:" + "|".join(re.escape(name) for name in sorted(modules)) + ")$",
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": source.get("base_model", ""),
        "task_type": None,
    }


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    return write_safetensors(path, tensors, metadata)
