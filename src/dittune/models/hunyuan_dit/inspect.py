"""Read a Hunyuan-DiT folder without loading weights: layout checks and version detection.

The version is decided by the weights: v1.0/v1.1 checkpoints carry
`time_extra_emb.style_embedder.weight` (size and style conditioning), v1.2 does not.
"""

from __future__ import annotations

from pathlib import Path

from dittune.models.facts import ModelInfo
from dittune.models.folder import pipeline_folder_problems, read_json, weight_keys

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
STYLE_KEY = "time_extra_emb.style_embedder.weight"
EXPECTED_BETA_END = {"v1.0/v1.1": 0.03, "v1.2": 0.018}


def folder_problems(path: Path) -> list[str]:
    """Missing pieces of a diffusers-layout Hunyuan-DiT folder, each with the fix."""
    return pipeline_folder_problems(path, "HunyuanDiTPipeline", COMPONENTS)


def detect(path: Path, keys: set[str] | None = None, checkpoint: Path | None = None) -> ModelInfo:
    """Detect the version from the transformer weights (`keys`, in diffusers names: those of `checkpoint` when the
    denoiser comes from a single file; default the folder's) and check configs agree with it."""
    path = Path(path)
    tcfg = read_json(path / "transformer" / "config.json")
    scfg = read_json(path / "scheduler" / "scheduler_config.json")
    keys = keys if keys is not None or checkpoint is not None else weight_keys(path / "transformer")
    weights = checkpoint if checkpoint is not None else f"{path}/transformer"
    config_says_style = bool(tcfg.get("use_style_cond_and_image_meta_size", True))
    warnings: list[str] = []
    if keys is None:
        has_style = config_says_style
        warnings.append("transformer weights are not safetensors; version taken from config.json")
    else:
        has_style = STYLE_KEY in keys
        if has_style != config_says_style:
            fix = (
                "fix config.json to match the weights"
                if checkpoint is None
                else "set model.components to a folder of the checkpoint's version"
            )
            raise ValueError(
                f"{weights}: the weights {'have' if has_style else 'lack'} the style embedder "
                f"(v{'1.0/1.1' if has_style else '1.2'}) but {path}/transformer/config.json sets "
                f"use_style_cond_and_image_meta_size={str(config_says_style).lower()}; {fix}"
            )
    version = "v1.0/v1.1" if has_style else "v1.2"
    if "distill" in path.name.lower():
        version += " (distilled)"
    base_version = "v1.0/v1.1" if has_style else "v1.2"
    beta_end = float(scfg.get("beta_end", 0.02))
    expected = EXPECTED_BETA_END[base_version]
    if abs(beta_end - expected) > 1e-9:
        warnings.append(
            f"scheduler beta_end is {beta_end:g} but {base_version} was trained with {expected:g}; "
            f"edit {path}/scheduler/scheduler_config.json unless this is intended"
        )
    prediction = scfg.get("prediction_type", "epsilon")
    if prediction != "v_prediction":
        raise ValueError(
            f"{path}/scheduler/scheduler_config.json has prediction_type={prediction!r}; Hunyuan-DiT is trained "
            'with "v_prediction" — set it there'
        )
    summary = {
        "layers": tcfg.get("num_layers"),
        "hidden": int(tcfg.get("num_attention_heads", 16)) * int(tcfg.get("attention_head_dim", 88)),
        "heads": tcfg.get("num_attention_heads"),
        "learn_sigma": tcfg.get("learn_sigma", True),
        "scheduler": f"{scfg.get('_class_name')} {scfg.get('beta_schedule')} beta_end={beta_end:g} {prediction}",
        "size/style conditioning": has_style,
    }
    return ModelInfo(family="hunyuan-dit", version=version, path=path, summary=summary, warnings=warnings)
