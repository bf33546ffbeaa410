"""Family name → spec class, imported lazily so `dittune config check` stays fast."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dittune.models.base import ModelSpec
    from dittune.models.facts import FamilyFacts

_FAMILIES: dict[str, str] = {
    "hunyuan-dit": "dittune.models.hunyuan_dit.spec:HunyuanDiTSpec",
    "sd3": "dittune.models.sd3.spec:SD3Spec",
    "pixart-sigma": "dittune.models.pixart_sigma.spec:PixArtSigmaSpec",
    "flux": "dittune.models.flux.spec:FluxSpec",
    "ltx-video": "dittune.models.ltx_video.spec:LTXVideoSpec",
    "cogvideox": "dittune.models.cogvideox.spec:CogVideoXSpec",
    "hunyuan-video": "dittune.models.hunyuan_video.spec:HunyuanVideoSpec",
    "wan": "dittune.models.wan.spec:WanSpec",
}


_TINY_BUILDERS: dict[str, tuple[str, tuple[str, ...]]] = {
    # family → (builder "module:function", variants with the default first)
    "hunyuan-dit": ("dittune.models.hunyuan_dit.tiny:build_tiny_hunyuan_dit", ("v1.2", "v1.1")),
    "sd3": ("dittune.models.sd3.tiny:build_tiny_sd3", ("sd3.5", "sd3", "sd3.5-medium")),
    "pixart-sigma": ("dittune.models.pixart_sigma.tiny:build_tiny_pixart_sigma", ("sigma", "sigma-microconditions")),
    "flux": ("dittune.models.flux.tiny:build_tiny_flux", ("dev", "schnell")),
    "ltx-video": ("dittune.models.ltx_video.tiny:build_tiny_ltx_video", ("0.9",)),
    "cogvideox": ("dittune.models.cogvideox.tiny:build_tiny_cogvideox", ("1.0", "1.5", "1.0-i2v", "1.5-i2v")),
    "hunyuan-video": ("dittune.models.hunyuan_video.tiny:build_tiny_hunyuan_video", ("t2v",)),
    "wan": ("dittune.models.wan.tiny:build_tiny_wan", ("2.1", "2.2", "2.2-a14b")),
}


def tiny_families() -> dict[str, tuple[str, ...]]:
    """Families with an offline tiny-model builder, and their variants (default first)."""
    return {family: variants for family, (_, variants) in _TINY_BUILDERS.items()}


def tiny_builder(family: str):
    """The `build(out_dir, variant=..., seed=...) -> Path` function of a family (imported lazily)."""
    target = _TINY_BUILDERS[family][0]
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def facts_class(family: str) -> type[FamilyFacts]:
    """The torch-free declarations of `family` (its spec class's base): for checks before any model loads."""
    spec_target = _known(family)
    module_name = spec_target.partition(":")[0].rsplit(".", 1)[0] + ".facts"
    module = importlib.import_module(module_name)
    spec_name = spec_target.partition(":")[2]
    return getattr(module, spec_name.removesuffix("Spec") + "Facts")


class UnknownFamily(ValueError):
    """A family name dittune does not know (the message lists the known ones)."""


def _known(family: str) -> str:
    try:
        return _FAMILIES[family]
    except KeyError:
        raise UnknownFamily(f"unknown model family {family!r}; known: {', '.join(family_names())}") from None


def spec_class(family: str) -> type[ModelSpec]:
    """The spec class for `family`; raises `UnknownFamily` (a ValueError) with the known names."""
    target = _known(family)
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def detect_family(model_path) -> str:
    """The family whose pipeline class is named in `model_path/model_index.json`."""
    import json
    from pathlib import Path

    index = Path(model_path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{model_path} has no model_index.json; pass a diffusers-layout model folder")
    name = json.loads(index.read_text()).get("_class_name")
    for family in family_names():
        if facts_class(family).accepts_pipeline(name):
            return family
    raise ValueError(f"{index} names {name}, which no dittune family handles (known: {', '.join(family_names())})")
