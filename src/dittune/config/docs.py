"""The config reference in Markdown, generated from the schema (`dittune config docs`, README)."""

from __future__ import annotations

import types
from pathlib import PurePath
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from dittune.config.errors import is_model, union_arms
from dittune.config.load import format_toml_value
from dittune.config.schema import DittuneConfig

START_MARKER = "<!-- config-reference:start -->"
END_MARKER = "<!-- config-reference:end -->"

_NAMES = {int: "int", float: "float", str: "str", bool: "bool"}
_INTRO = (
    "Generated from `src/dittune/config/schema.py` (`dittune config docs` prints it). "
    "Relative paths in a config file are resolved against the folder holding the file; "
    "paths given with `--set` are relative to the current directory. "
    "Any key can be overridden on the command line with `--set section.key=value` "
    "(the value is read as TOML; a bare word is a string)."
)


def render_type(annotation: Any) -> str:
    """A readable type: `"pixel" | "area"`, `int`, `float | unset`, `list of str`, `path`."""
    parts = [_render_arm(arm) for arm in union_arms(annotation)]
    if accepts_none(annotation):
        parts.append("unset")
    return " | ".join(parts)


def accepts_none(annotation: Any) -> bool:
    """Whether `None` (an unset option) is allowed."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        return any(accepts_none(arm) for arm in get_args(annotation))
    return annotation is type(None) or annotation is None


def _render_arm(arm: Any) -> str:
    origin, args = get_origin(arm), get_args(arm)
    if origin is Literal:
        return " | ".join(format_toml_value(v) for v in args)
    if origin in (list, tuple):
        inner = render_type(args[0]) if args else "any"
        return f"list of ({inner})" if " | " in inner else f"list of {inner}"
    if origin is dict:
        inner = render_type(args[1]) if args else "any"
        return f"table of ({inner})" if " | " in inner else f"table of {inner}"
    if isinstance(arm, type) and issubclass(arm, PurePath):
        return "path"
    if is_model(arm):
        return "table"
    return _NAMES.get(arm, getattr(arm, "__name__", str(arm)))


def render_bounds(field: FieldInfo) -> str:
    """Numeric constraints of a field, e.g. `≥ 1` or `≥ 0, < 1` (empty if none)."""
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    bounds = [
        f"{symbol} {getattr(meta, name)!r}"
        for meta in field.metadata
        for name, symbol in symbols.items()
        if getattr(meta, name, None) is not None
    ]
    return ", ".join(bounds)


def render_default(field: FieldInfo) -> str:
    """`**required**`, `unset`, or the default as an inline TOML value."""
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    return "unset" if value is None else f"`{format_toml_value(value)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(model: type[BaseModel], names: list[str]) -> list[str]:
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name in names:
        field = model.model_fields[name]
        bounds = render_bounds(field)
        kind = f"`{_cell(render_type(field.annotation))}`" + (f" ({bounds})" if bounds else "")
        rows.append(f"| `{name}` | {kind} | {_cell(render_default(field))} | {_cell(field.description or '')} |")
    return rows


def _sections(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, type[BaseModel], FieldInfo]]:
    """(dotted name, model, field) of every section below `model`, depth first."""
    found = []
    for name, field in model.model_fields.items():
        section = next((a for a in union_arms(field.annotation) if is_model(a)), None)
        if section is not None:
            dotted = ".".join((*prefix, name))
            found.append((dotted, section, field))
            found.extend(_sections(section, (*prefix, name)))
    return found


def config_reference_markdown(heading_level: int = 3) -> str:
    """The full option reference: top-level keys, then one table per `[section]`. Deterministic."""
    hashes = "#" * heading_level
    lines = [_INTRO, ""]
    top = [n for n, f in DittuneConfig.model_fields.items() if not any(map(is_model, union_arms(f.annotation)))]
    if top:
        lines += [f"{hashes} Top-level keys", "", *_table(DittuneConfig, top), ""]
    for dotted, section, field in _sections(DittuneConfig):
        keys = [n for n, f in section.model_fields.items() if not any(map(is_model, union_arms(f.annotation)))]
        note = "Required section." if field.is_required() else "Optional section."
        lines += [f"{hashes} [{dotted}]", "", note, ""]
        if field.description:
            lines += [_cell(field.description), ""]
        lines += [*_table(section, keys), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def update_readme_section(readme_text: str) -> str:
    """Replace what lies between the config-reference markers with the generated reference.

    Raises `ValueError` if a marker is missing or the end marker comes first.
    """
    start = readme_text.find(START_MARKER)
    end = readme_text.find(END_MARKER)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"README needs {START_MARKER} followed by {END_MARKER} to hold the config reference")
    head = readme_text[: start + len(START_MARKER)]
    return f"{head}\n\n{config_reference_markdown()}\n{readme_text[end:]}"
