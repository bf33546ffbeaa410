"""What `dittune config check` reads besides the config: the model's files and the data folder.

No model is loaded. The model folder's JSON files are parsed and its safetensors headers read (a truncated
download is named here); the data folder is discovered and planned as training plans it (every image decoded
once), so a folder without a usable image is an error, and every skipped file and empty caption is listed in
the bucket report that training prints at start-up.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dittune.config import DittuneConfig
from dittune.models.registry import facts_class, family_names

Problem = tuple[str, str]


def json_problems(cfg: DittuneConfig) -> list[Problem]:
    """The model's JSON files (model_index.json, each component's configs) that cannot be parsed."""
    folder = cfg.model.folder
    key = "model.components" if cfg.model.components is not None else "model.path"
    files = sorted([*folder.glob("*.json"), *folder.glob("*/*.json")]) if folder.is_dir() else []
    return [(key, problem) for problem in map(_json_problem, files) if problem]


def weight_problems(cfg: DittuneConfig) -> list[Problem]:
    """Truncated or damaged safetensors files of the model (its folder and its single-file checkpoint)."""
    from dittune.models.weight_files import damaged_weight_files, safetensors_problem

    key = "model.components" if cfg.model.components is not None else "model.path"
    problems = [(key, problem) for problem in damaged_weight_files(cfg.model.folder)]
    checkpoint = cfg.model.checkpoint
    if checkpoint is not None and checkpoint.suffix.lower() == ".safetensors" and checkpoint.is_file():
        problems += [("model.path", p) for p in [safetensors_problem(checkpoint)] if p]
    return problems


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        return f"{path} is not valid JSON ({error}); download or copy it again"
    except OSError as error:
        return f"cannot read {path} ({error.strerror or error})"
    return None


def data_report(cfg: DittuneConfig, model_readable: bool = True) -> tuple[str, list[Problem]]:
    """(the bucket report training would print, problems); ("", []) when the family or data folder is unknown.

    The model's configs give the alignment and frame rule when `model_readable`, else the family's defaults."""
    from dittune.train.data_plan import bucket_report, plan_data

    if cfg.model.family not in family_names() or not cfg.data.path.is_dir():
        return "", []  # reported by preflight
    folder = cfg.model.folder
    known = model_readable and (folder / "model_index.json").is_file()
    try:
        plan = plan_data(cfg, facts_class(cfg.model.family), folder if known else None)
    except ValueError as error:  # DataError: nothing usable; or a bucket setting preflight also names
        return "", [("", str(error))]
    return bucket_report(cfg, plan), []


def unreadable_weights_message(args: argparse.Namespace, error: Exception) -> str:
    """The message for a weight file a loader failed on: the damaged files of the command's model, found by
    their headers (the loader's own error names none), or the error with the advice to check the files."""
    from dittune.config import load_config
    from dittune.models.weight_files import damaged_weight_files

    folder: Path | None = None
    if getattr(args, "model", None):
        folder = Path(args.model)
    elif getattr(args, "config", None):
        try:
            folder = load_config(Path(args.config), args.set).model.folder
        except (OSError, ValueError):
            folder = None
    problems = damaged_weight_files(folder) if folder is not None else []
    if problems:
        return "; ".join(problems)
    return f"a weight file cannot be read ({error}); check that the model's .safetensors files are complete"
