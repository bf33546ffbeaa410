"""The dittune LoRA file: safetensors with diffusers-style keys and its settings in the metadata.

Keys: `<component>.<module path>.lora_A.weight` / `.lora_B.weight` (e.g.
`transformer.blocks.0.attn1.to_q.lora_A.weight`). Metadata:
- `dittune_lora`: JSON with format, family, component, rank, alpha, targets, base model, version;
- `lora_adapter_metadata`: the peft LoraConfig fields diffusers' `load_lora_weights` reads, prefixed
  with the component as diffusers writes them (`transformer.r`, `transformer.lora_alpha`, ...).
Alpha is always stored, so tools never fall back to a wrong scale.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "dittune-lora/1"


@dataclass
class LoraInfo:
    family: str
    component: str
    rank: int
    alpha: float
    targets: list[str]
    base_model: str = ""
    version: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def save_lora(path: Path, state: dict[str, torch.Tensor], info: LoraInfo) -> Path:
    """Write the adapter atomically; `state` keys are relative to the component."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{info.component}.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    # diffusers' load_lora_weights reads these keys prefixed with the component ("transformer.r", ...)
    peft_meta = {
        f"{info.component}.{key}": value
        for key, value in {"r": info.rank, "lora_alpha": info.alpha, "target_modules": info.targets}.items()
    }
    metadata = {
        "format": "pt",
        "dittune_lora": json.dumps({"format": FORMAT, **asdict(info)}, sort_keys=True),
        "lora_adapter_metadata": json.dumps(peft_meta, sort_keys=True),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], LoraInfo]:
    """Tensors (keys relative to the component) and settings of a dittune LoRA file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        if "dittune_lora" not in metadata:
            raise ValueError(f"{path} is not a dittune LoRA file (no 'dittune_lora' metadata); convert it first")
        raw = json.loads(metadata["dittune_lora"])
        raw.pop("format", None)
        info = LoraInfo(**raw)
        prefix = info.component + "."
        state = {k.removeprefix(prefix): handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    return state, info
