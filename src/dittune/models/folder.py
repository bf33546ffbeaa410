"""Reading diffusers-layout pipeline folders without loading weights (shared by every family)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def pipeline_folder_problems(path: Path, pipeline_class: str, components: tuple[str, ...]) -> list[str]:
    """Missing pieces of a `pipeline_class` folder, each with the fix."""
    path = Path(path)
    if not path.is_dir():
        return [f"model folder {path} does not exist"]
    if not (path / "model_index.json").is_file():
        return [f"{path} has no model_index.json; point model.path at a diffusers-layout pipeline folder"]
    problems = []
    declared = read_json(path / "model_index.json").get("_class_name")
    if declared not in (None, pipeline_class):
        problems.append(f"{path}/model_index.json declares {declared}, not {pipeline_class}; is model.family right?")
    for name in components:
        if not (path / name).is_dir():
            problems.append(f"{path} lacks the {name}/ subfolder (a complete {pipeline_class} folder is needed)")
    return problems


def weight_keys(folder: Path) -> set[str] | None:
    """Tensor names of a component's safetensors weights (header only), or None if there are none."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    keys: set[str] = set()
    for file in files:
        with safe_open(file, framework="pt") as handle:
            keys.update(handle.keys())
    return keys
