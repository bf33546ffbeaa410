"""Small synthetic datasets for trying dittune and for tests (no downloads)."""

from __future__ import annotations

from typing import Any

__all__ = ["make_shapes_dataset"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m dittune.demo.shapes` does not import the module twice.
    if name == "make_shapes_dataset":
        from dittune.demo.shapes import make_shapes_dataset

        return make_shapes_dataset
    raise AttributeError(name)
