"""Family name → spec class, imported lazily so `dittune config check` stays fast."""

from __future__ import annotations

import importlib

from dittune.models.base import ModelSpec

_FAMILIES: dict[str, str] = {
    "hunyuan-dit": "dittune.models.hunyuan_dit.spec:HunyuanDiTSpec",
}


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def spec_class(family: str) -> type[ModelSpec]:
    """The spec class for `family`; raises KeyError with the known names."""
    try:
        target = _FAMILIES[family]
    except KeyError:
        raise KeyError(f"unknown model family {family!r}; known: {', '.join(family_names())}") from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
