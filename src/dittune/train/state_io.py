"""Nested training state (optimizer, schedule, data position, RNG states) as safetensors + JSON — no pickle.

`save_tree(obj, folder, name)` writes `name.json` (the structure: dicts, lists, tuples, numbers, strings,
None) and, when the state holds tensors or NumPy arrays, `name.safetensors` (their data, referred to from the
JSON by key). `load_tree` rebuilds the object: reading either file runs no code, unlike `torch.load` of a
pickle, so a doctored checkpoint can at worst hold wrong numbers, which the checkpoint's manifest then catches.

Tagged JSON nodes: `{"__tensor__": key}`, `{"__ndarray__": key}`, `{"__tuple__": [...]}` and
`{"__dict__": [[key, value], ...]}` for dicts whose keys are not all strings (an optimizer's state is keyed by
parameter index). Any other type is refused with the path to it, so nothing is silently dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = "dittune-state-1"
_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__")


class _Encoder:
    """Turns a nested object into JSON-able nodes, collecting its tensors."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[int] = set()

    def _tensor(self, tensor: torch.Tensor) -> str:
        tensor = tensor.detach().cpu().contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in self._storages:
            tensor = tensor.clone()  # safetensors refuses tensors sharing memory
        if tensor.numel():
            self._storages.add(tensor.untyped_storage().data_ptr())
        key = f"t{len(self.tensors)}"
        self.tensors[key] = tensor
        return key

    def encode(self, obj: Any, where: str) -> Any:
        if obj is None or isinstance(obj, bool | int | str):
            return obj
        if isinstance(obj, float):
            return float(obj) if math.isfinite(obj) else {"__float__": repr(float(obj))}  # np.float64 too
        if isinstance(obj, torch.Tensor):
            return {"__tensor__": self._tensor(obj)}
        if isinstance(obj, np.ndarray):
            array = np.ascontiguousarray(obj).reshape(obj.shape)  # (ascontiguousarray makes 0-d arrays 1-d)
            return {"__ndarray__": self._tensor(torch.from_numpy(array))}
        if isinstance(obj, np.generic):
            return self.encode(obj.item(), where)
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if all(isinstance(k, str) and k not in _TAGS for k in obj):
                return {k: self.encode(v, f"{where}.{k}") for k, v in obj.items()}
            return {"__dict__": [[self.encode(k, where), self.encode(v, f"{where}[{k!r}]")] for k, v in obj.items()]}
        raise TypeError(f"cannot store {type(obj).__name__} at {where} in a checkpoint (tensors and plain values only)")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__ndarray__" in node:
        return tensors[node["__ndarray__"]].numpy()
    if "__float__" in node:
        return float(node["__float__"])
    if "__tuple__" in node:
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    if "__dict__" in node:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["__dict__"]}
    return {k: _decode(v, tensors) for k, v in node.items()}


def save_tree(obj: Any, folder: Path, name: str) -> list[Path]:
    """Write `obj` as `folder/name.json` (+ `name.safetensors` when it holds tensors); returns the files."""
    encoder = _Encoder()
    tree = encoder.encode(obj, name)
    folder = Path(folder)
    written = []
    if encoder.tensors:
        save_file(encoder.tensors, str(folder / f"{name}.safetensors"), metadata={"format": FORMAT})
        written.append(folder / f"{name}.safetensors")
    document = {"format": FORMAT, "tensors": bool(encoder.tensors), "tree": tree}
    (folder / f"{name}.json").write_text(json.dumps(document, allow_nan=False))
    written.append(folder / f"{name}.json")
    return written


def load_tree(folder: Path, name: str) -> Any:
    """The object `save_tree` wrote under `name` (tensors on the CPU); FileNotFoundError when it is absent."""
    folder = Path(folder)
    document = json.loads((folder / f"{name}.json").read_text())
    if document.get("format") != FORMAT:
        raise ValueError(f"{folder / name}.json is not a dittune state file (format {document.get('format')!r})")
    tensors = load_file(str(folder / f"{name}.safetensors")) if document.get("tensors") else {}
    return _decode(document["tree"], tensors)


def rng_states() -> dict[str, Any]:
    """This process's random generators: Python's, NumPy's global one, torch's CPU and CUDA ones."""
    import random

    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state()}
    states["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back what `rng_states` returned (CUDA states only when the device count matches)."""
    import random

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
