"""`dittune export RUN --to single-file|official`: a full fine-tune's denoiser as one checkpoint file.

- `single-file`: one `.safetensors` in the family's original layout (the names ComfyUI, the official code and
  diffusers' `from_single_file` read); in diffusers names for a family without an original layout.
- `official`: the same tensors as a `.pt` state dict (`torch.save`), as the official trainers write them
  (Hunyuan-DiT's `pytorch_model_*.pt`).
The input is a run's output folder (its `final/` diffusers folder) or any diffusers folder. Nothing here names a
family: the layout comes from the family detected in model_index.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dittune.models.layout_convert import to_theirs_state
from dittune.models.registry import detect_family, facts_class

TARGETS = ("single-file", "official")


def pipeline_folder(run: Path) -> Path:
    """The diffusers folder of a run (`RUN/final`) or `run` itself when it is one."""
    run = Path(run)
    for folder in (run / "final", run):
        if (folder / "model_index.json").is_file():
            return folder
    if (run / "final" / "lora.safetensors").is_file():
        raise ValueError(f"{run} is a LoRA run; convert its adapter with `dittune lora convert` instead")
    raise FileNotFoundError(f"{run} has no final/model_index.json: give the output folder of a full fine-tune")


def read_component(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers component folder (sharded safetensors included)."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


def export_denoiser(run: Path, to: str, out: Path | None = None, component: str | None = None) -> Path:
    """Write the denoiser of `run` as `to` (see `TARGETS`); returns the file written."""
    if to not in TARGETS:
        raise ValueError(f"--to {to}: use one of {', '.join(TARGETS)}")
    folder = pipeline_folder(run)
    family = detect_family(folder)
    facts = facts_class(family)
    component = component or facts.denoiser_component
    layout = facts.original_layout()
    if layout is not None and not layout.original:
        layout = None
    if layout is None and to == "official":
        raise ValueError(f"{facts.display_name} has no official checkpoint layout in dittune; use --to single-file")
    state = read_component(folder / component)
    tensors = to_theirs_state(state, layout) if layout else state
    layout_name = layout.name if layout else "diffusers"
    suffix = ".pt" if to == "official" else ".safetensors"
    out = Path(out) if out is not None else Path(run) / "export" / f"{component}-{layout_name}{suffix}"
    if out.suffix != suffix:
        raise ValueError(f"--out {out}: {to} checkpoints are {suffix} files")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if to == "official":
        torch.save(tensors, tmp)
    else:
        from safetensors.torch import save_file

        source = {"family": family, "component": component, "layout": layout_name, "from": str(folder)}
        save_file(tensors, str(tmp), metadata={"format": "pt", "dittune_source": json.dumps(source, sort_keys=True)})
    os.replace(tmp, out)
    return out
