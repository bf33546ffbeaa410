"""Checks of weight files that read headers only (no torch): a truncated or damaged `.safetensors` file is named with
its path and the fix, before a loader fails on it with an error that does not say which file it was."""

from __future__ import annotations

import json
from pathlib import Path


def safetensors_problem(path: Path, header_only_ok: bool = False) -> str | None:
    """Why the `.safetensors` file at `path` cannot be read whole (truncated, damaged header), or None.

    Reads the header only: the file must be as long as the header's last tensor says. `header_only_ok` lets a file
    cut exactly at its header pass (its shapes stay readable: `dittune estimate` works on such folders)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if length < 0 or 8 + length > size:
                return f"{path} is truncated ({size} bytes, too short for its header); download or copy it again"
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as error:
        return f"{path} is not a readable safetensors file ({error}); download or copy it again"
    if not isinstance(header, dict):
        return f"{path} has a damaged safetensors header; download or copy it again"
    offsets = [
        entry.get("data_offsets") for key, entry in header.items() if key != "__metadata__" and isinstance(entry, dict)
    ]
    ends = [pair[1] for pair in offsets if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], int)]
    expected = 8 + length + max(ends, default=0)
    if size == 8 + length < expected:
        if header_only_ok:
            return None
        return f"{path} holds only its header, no tensor data ({size} bytes of {expected}); download the weights"
    if size < expected:
        return (
            f"{path} is truncated: {size} bytes, its header describes {expected}; download or copy it again "
            "(an interrupted download or a full disk?)"
        )
    return None


def damaged_weight_files(folder: Path, header_only_ok: bool = False) -> list[str]:
    """`safetensors_problem` of every `.safetensors` file in a model folder and its component subfolders."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("*/*.safetensors")])
    return [problem for file in files if (problem := safetensors_problem(file, header_only_ok))]


def check_weight_files(folder: Path, checkpoint: Path | None = None, header_only_ok: bool = False) -> None:
    """Raise a ValueError naming every truncated or damaged weight file of a model (its folder and checkpoint)."""
    problems = damaged_weight_files(folder, header_only_ok)
    if checkpoint is not None and checkpoint.suffix.lower() == ".safetensors" and checkpoint.is_file():
        problems += [p for p in [safetensors_problem(checkpoint, header_only_ok)] if p]
    if problems:
        raise ValueError("; ".join(problems))
