"""The dittune LoRA file: safetensors with diffusers-style keys and its settings in the metadata.

Keys: `<prefix>.<module path>.lora_A.weight` / `.lora_B.weight` (e.g.
`transformer.blocks.0.attn1.to_q.lora_A.weight`), the prefix being the component. Metadata:
- `dittune_lora`: JSON with format, family, component, rank, alpha, targets, base model, version, and
  `key_prefix` when the keys are not prefixed by the component;
- `lora_adapter_metadata`: the peft LoraConfig fields diffusers' `load_lora_weights` reads, prefixed
  like the keys, as diffusers writes them (`transformer.r`, `transformer.lora_alpha`, ...).
Alpha is always stored, so tools never fall back to a wrong scale.

`key_prefix` serves a family whose diffusers loader reads every adapter under one name and picks the
component with an argument: Wan 2.2 A14B's low-noise expert (`transformer_2`) is saved with
`transformer.` keys, which `WanPipeline.load_lora_weights(..., load_into_transformer_2=True)` expects;
`dittune.load_lora` still applies it to `component`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from dittune.safetensors_bytes import write_safetensors

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
    key_prefix: str | None = None
    """The prefix of the file's keys when it is not `component` (None: the component)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Module name → rank, for modules whose rank is not `rank` (files converted from other formats)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Module name → alpha, for modules whose alpha is not `alpha`."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def prefix(self) -> str:
        """The prefix of the file's keys and peft metadata."""
        return self.key_prefix or self.component


def save_lora(path: Path, state: dict[str, torch.Tensor], info: LoraInfo) -> Path:
    """Write the adapter atomically; `state` keys are relative to the component (prefixed by `info.prefix`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{info.prefix}.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    # diffusers' load_lora_weights reads these keys prefixed like the tensors ("transformer.r", ...)
    peft = {"r": info.rank, "lora_alpha": info.alpha, "target_modules": info.targets}
    peft.update({k: v for k, v in (("rank_pattern", info.rank_pattern), ("alpha_pattern", info.alpha_pattern)) if v})
    peft_meta = {f"{info.prefix}.{key}": value for key, value in peft.items()}
    settings = asdict(info)
    if info.prefix == info.component:
        del settings["key_prefix"]  # files whose keys carry the component stay as they always were
    for pattern in ("rank_pattern", "alpha_pattern"):
        if not settings[pattern]:
            del settings[pattern]
    metadata = {
        "format": "pt",
        "dittune_lora": json.dumps({"format": FORMAT, **settings}, sort_keys=True),
        "lora_adapter_metadata": json.dumps(peft_meta, sort_keys=True),
    }
    return write_safetensors(path, tensors, metadata)


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
        prefix = info.prefix + "."
        state = {k.removeprefix(prefix): handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    return state, info
