"""safetensors files with reproducible bytes: the same tensors and metadata always give the same file.

safetensors writes a file's header (tensor entries and metadata) in a per-process random order, so two runs that
save equal tensors would write different bytes (and different checksums). Here the header's keys are sorted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save


def canonical(data: bytes) -> bytes:
    """`data` (a safetensors file) with its header's keys in sorted order; the tensor data is unchanged."""
    length = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(header).to_bytes(8, "little") + header + data[8 + length :]


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file of `tensors` and `metadata`, with a sorted header."""
    return canonical(save(tensors, metadata=metadata))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` to `path` atomically (a temporary file renamed into place), with a sorted header."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(safetensors_bytes(tensors, metadata))
    os.replace(tmp, path)
    return path
