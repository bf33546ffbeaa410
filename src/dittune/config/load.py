"""Load a dittune config: parse the TOML file, apply `--set` overrides, resolve paths, validate.

Path options (`output_dir`, `model.path`, `data.path`, `cache.dir`, and any later `Path` field) given
as relative paths in the TOML file are resolved against the folder holding that file, so a config
works from any current directory; `~` is expanded and absolute paths are kept. Paths given with
`--set` on the command line are relative to the current working directory instead.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any

from pydantic import BaseModel, ValidationError

from dittune.config.errors import (
    ConfigError,
    Problem,
    annotation_at,
    format_loc,
    problems_from_validation_error,
    schema_keys,
    union_arms,
)
from dittune.config.schema import DittuneConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

OVERRIDE_FORM = "--set dotted.key=value (e.g. --set train.max_steps=100)"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_POSITION = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$", re.DOTALL)


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; a syntax error becomes a `ConfigError` naming the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(str(path), f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    except tomllib.TOMLDecodeError as exc:
        text = str(exc)
        line, col = getattr(exc, "lineno", None), getattr(exc, "colno", None)
        match = _TOML_POSITION.match(text)
        if match:
            text, line, col = match["msg"], int(match["line"]), int(match["col"])
        where = f"line {line}, column {col}: " if line is not None else ""
        raise ConfigError([Problem(str(path), f"{where}invalid TOML: {text}")]) from None


def _path_keys() -> list[tuple[str, ...]]:
    """Key paths of every `Path`-typed option in the schema."""
    return [
        key
        for key in schema_keys()
        if any(isinstance(a, type) and issubclass(a, PurePath) for a in union_arms(annotation_at(key)))
    ]


def resolve_paths(data: dict[str, Any], base: Path, under: tuple[str, ...] = ()) -> None:
    """Make relative path strings in `data` (at path options below `under`) relative to `base`, in place."""
    for key in _path_keys():
        if key[: len(under)] != under:
            continue
        node: Any = data
        for part in key[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(key[-1]), str):
            value = Path(node[key[-1]]).expanduser()
            node[key[-1]] = str(value if value.is_absolute() else base / value)


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """Split `dotted.key=value` into the key path and the value, read as a TOML value.

    Text that is not a TOML value (a bare word such as `bf16` or `runs/a`) is kept as a string, and
    so is any value given for a string or path option (`--set model.family=123` stays "123").
    """
    key_text, sep, value_text = text.partition("=")
    key = tuple(part.strip() for part in key_text.split("."))
    if not sep or not all(key):
        raise ConfigError([Problem("--set", f"{text!r} is not of the form {OVERRIDE_FORM}")])
    value_text = value_text.strip()
    try:
        parsed = tomllib.loads(f"v = {value_text}")
    except tomllib.TOMLDecodeError:
        return key, value_text
    if set(parsed) != {"v"}:
        return key, value_text
    value = parsed["v"]
    arms = union_arms(annotation_at(key))
    text_only = bool(arms) and all(a is str or (isinstance(a, type) and issubclass(a, PurePath)) for a in arms)
    if text_only and not isinstance(value, str):
        return key, value_text
    return key, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], cwd: Path | None = None) -> dict[str, Any]:
    """A copy of `data` with each `dotted.key=value` override set (missing tables are created).

    Relative paths in override values are resolved against `cwd` (default: the current directory).
    """
    data = copy.deepcopy(data)
    base = Path.cwd() if cwd is None else cwd
    problems: list[Problem] = []
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        node = data
        for depth, part in enumerate(key[:-1], start=1):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = format_loc(key[:depth])
                problems.append(Problem(format_loc(key), f"cannot set it: {prefix} is {child!r}, not a table"))
                break
            node = child
        else:
            node[key[-1]] = value
            resolve_paths(data, base, under=key)
    if problems:
        raise ConfigError(problems)
    return data


def validate_config(data: dict[str, Any]) -> DittuneConfig:
    """Validate a plain dict; every problem found is reported in one `ConfigError`."""
    try:
        return DittuneConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems_from_validation_error(exc)) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DittuneConfig:
    """Read, override and validate a TOML config (see the module docstring for path handling).

    Raises `FileNotFoundError` if the file is missing and `ConfigError` for anything wrong inside it.
    """
    path = Path(path)
    data = read_toml(path)
    resolve_paths(data, path.absolute().parent)
    return validate_config(apply_overrides(data, overrides))


# --- writing ----------------------------------------------------------------------------------


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def format_toml_value(value: Any) -> str:
    """`value` as an inline TOML value (strings, numbers, booleans, paths, lists, tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, PurePath):
        return _toml_string(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(str(k))} = {format_toml_value(v)}" for k, v in value.items())
        return "{" + (f" {items} " if items else "") + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML: {value!r}")


def _emit(model: BaseModel, prefix: tuple[str, ...], lines: list[str]) -> None:
    sections: list[tuple[str, BaseModel]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            sections.append((name, value))
        elif value is None:
            lines.append(f"# {_toml_key(name)} = (unset)")
        else:
            lines.append(f"{_toml_key(name)} = {format_toml_value(value)}")
    for name, section in sections:
        header = ".".join(_toml_key(k) for k in (*prefix, name))
        lines.extend(["", f"[{header}]"])
        _emit(section, (*prefix, name), lines)


def resolved_toml(cfg: DittuneConfig) -> str:
    """The complete config as TOML: every default filled in, unset options as `# key = (unset)`.

    `load_config` reads the text back to an equal config (paths are absolute after loading).
    """
    lines = ["# dittune config, fully resolved: every default filled in, unset options commented."]
    _emit(cfg, (), lines)
    return "\n".join(lines) + "\n"
