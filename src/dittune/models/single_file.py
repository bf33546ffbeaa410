"""Single-file denoiser checkpoints: read one `.safetensors` or official `.pt`, in diffusers names or the family's
original layout, into the diffusers class built from the components folder's config.

`.pt`/`.pth`/`.ckpt`/`.bin` files are read with `torch.load(weights_only=True)` (tensors only, no code runs); a
state dict nested under `ema`, `module`, `state_dict` or `model` is unwrapped. The layout is told from the names:
a file whose keys are the diffusers model's (after a `transformer.` or `model.diffusion_model.` prefix) loads as
is, any other goes through the family's `Layout`. Every tensor must find its place and every parameter be filled.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dittune.models.layout import Fuse, Key, Layout, Rename
from dittune.models.layout_convert import from_theirs_state
from dittune.models.weight_files import safetensors_problem

NESTED = ("ema", "module", "state_dict", "model")
DIFFUSERS_PREFIXES = ("transformer.", "model.diffusion_model.", "diffusion_model.")
BUNDLE_PREFIX = "model.diffusion_model."


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file checkpoint, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.path {path} does not exist")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        problem = safetensors_problem(path)
        if problem:
            raise ValueError(problem)
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickles with code, or not a torch file at all
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True) ({type(error).__name__}: {error}); "
            "dittune reads tensors only: convert it to .safetensors"
        ) from None
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        nested = next((state[k] for k in NESTED if isinstance(state.get(k), dict)), None)
        if nested is None:
            break
        state = nested
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} holds no state dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def denoiser_part(names: list[str]) -> list[str]:
    """The names of the denoiser's tensors: in a file bundling the VAE and text encoders as well (SAI and ComfyUI
    "all-in-one" checkpoints), those under `model.diffusion_model.`; else all."""
    bundled = [n for n in names if n.startswith(BUNDLE_PREFIX)]
    return bundled or names


def checkpoint_names(path: Path) -> list[str]:
    """Tensor names of a checkpoint (the header only, for .safetensors)."""
    if Path(path).suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            return denoiser_part(list(handle.keys()))
    return denoiser_part(list(read_checkpoint(path)))


def diffusers_names(names: list[str], layout: Layout | None, expected: set[str]) -> list[str]:
    """The diffusers tensor names a checkpoint's `names` become (no tensors needed)."""
    plain = _strip_diffusers_prefix(names, expected)
    if plain is not None or layout is None:
        return plain if plain is not None else names
    out = []
    for raw in names:
        name = layout.strip_prefix(raw)
        match = layout.match_theirs(name)
        if match is not None and isinstance(match.rule, Key):
            out.append(match.ours[0])
            continue
        module, _, param = name.rpartition(".")
        match = layout.match_theirs(module)
        if match is None or isinstance(match.rule, Key):
            out.append(name)
        elif isinstance(match.rule, Rename):
            out.append(f"{match.ours[0]}.{match.rule.our_param(param)}")
        elif isinstance(match.rule, Fuse):
            out += [f"{part}.{param}" for part in match.ours]
    return out


def _strip_diffusers_prefix(names: list[str], expected: set[str]) -> list[str] | None:
    """`names` without a common prefix when they are then the diffusers model's own names; else None."""
    if not expected:
        return None
    for prefix in ("", *DIFFUSERS_PREFIXES):
        plain = [n.removeprefix(prefix) for n in names if n.startswith(prefix)]
        if len(plain) == len(names) and len(set(plain) & expected) >= 0.9 * len(expected):
            return plain
    return None


def load_checkpoint_into(model: nn.Module, path: Path, layout: Layout | None) -> None:
    """Fill `model` (built from its config, parameters possibly on the meta device) from the checkpoint at `path`."""
    state = read_checkpoint(path)
    state = {name: state[name] for name in denoiser_part(list(state))}
    expected = set(model.state_dict())
    plain = _strip_diffusers_prefix(list(state), expected)
    if plain is not None:
        state = dict(zip(plain, state.values(), strict=True))
    elif layout is not None:
        state = from_theirs_state(state, layout)
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        where = f"the {layout.name} layout or diffusers names" if layout else "diffusers names"
        raise ValueError(
            f"{path} does not fit {type(model).__name__} as configured by model.components (read as {where}): "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
            "Is it another version or size than the components folder's denoiser config.json?"
        )
    own = model.state_dict()
    wrong = [k for k in expected if state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"{path}: {len(wrong)} tensors have other shapes than the components folder's config.json gives "
            f"(e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}); use the components of the same version"
        )
    model.load_state_dict(state, strict=True, assign=True)


def cast_like_from_pretrained(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`dtype` for the loaded tensors, except the class's `_keep_in_fp32_modules` (kept in fp32, as
    `from_pretrained(torch_dtype=...)` does); non-persistent buffers (e.g. RoPE tables) stay as built."""
    cast_floating(model, dtype, diffusers_keep(getattr(type(model), "_keep_in_fp32_modules", None)))
    return model


def cast_floating(model: torch.nn.Module, dtype: torch.dtype | None, keep: Callable[[str], bool]) -> None:
    """The checkpoint's floating tensors (parameters and persistent buffers) in fp32 where their names match
    `keep`, else in `dtype` (None: as they are), as loading them does; other buffers stay as built."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_floating_point():
            wanted = torch.float32 if keep(name) else dtype or tensor.dtype
            if tensor.dtype != wanted:
                tensor.data = tensor.data.to(wanted)


def diffusers_keep(patterns: Any) -> Callable[[str], bool]:
    """diffusers' rule: a name with a `_keep_in_fp32_modules` entry as one of its dotted parts."""
    kept = set(patterns or ())
    return lambda name: bool(kept.intersection(name.split(".")))
