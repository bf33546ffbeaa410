"""Write a full fine-tune as a complete diffusers pipeline folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_full_pipeline(base: Path, component: str, denoiser: nn.Module, out_dir: Path) -> Path:
    """Copy every component of `base` except `component` (hard links where possible), save the trained one.

    Written to a temporary folder and renamed, so `out_dir` is either complete or absent.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for child in Path(base).iterdir():
        if child.name == component or child.name.startswith("."):
            continue
        if child.is_dir():
            shutil.copytree(child, tmp / child.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(child), str(tmp / child.name))
    denoiser.save_pretrained(tmp / component, safe_serialization=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
