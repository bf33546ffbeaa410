"""Config problems: `ConfigError`, and the translation of pydantic errors into readable lines.

Every problem names the dotted key it is about (`train.batch_size`, `train.trackers[0]`) and says
what was expected, so a user can fix all of them in one edit.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from dittune.config.schema import DittuneConfig

Loc = tuple[str | int, ...]

_EXPECTED = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "a boolean (true or false)",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "path_type": "a path (a string)",
}
_PATH_PREFIX = re.compile(r"^([A-Za-z_][\w\-]*(?:\.[\w\-]+|\[\d+\])*): (.+)$", re.DOTALL)


class Problem(NamedTuple):
    """One thing wrong with a config: the dotted key path it concerns, and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(ValueError):
    """An invalid config. `problems` lists everything found; `str()` gives one line per problem."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(dict.fromkeys(problems))
        super().__init__("\n".join(str(p) for p in self.problems))


# --- schema walking ---------------------------------------------------------------------------


def union_arms(annotation: Any) -> list[Any]:
    """The non-None members of a union (or the annotation itself), with `Annotated` stripped."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        return [a for arm in get_args(annotation) if arm is not type(None) for a in union_arms(arm)]
    return [annotation]


def is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def child_annotation(annotation: Any, key: str | int) -> Any | None:
    """The annotation one step below `annotation` (model field, list item or table value), if any."""
    for arm in union_arms(annotation):
        origin = get_origin(arm)
        if is_model(arm) and isinstance(key, str) and key in arm.model_fields:
            return arm.model_fields[key].annotation
        if origin in (list, tuple) and isinstance(key, int) and get_args(arm):
            return get_args(arm)[0]
        if origin is dict and isinstance(key, str) and get_args(arm):
            return get_args(arm)[1]
    return None


def annotation_at(loc: Sequence[str | int], root: type[BaseModel] = DittuneConfig) -> Any | None:
    """The annotation of the value at `loc` (a key path) in the schema, or None if there is none."""
    annotation: Any = root
    for key in loc:
        annotation = child_annotation(annotation, key)
        if annotation is None:
            return None
    return annotation


def model_at(loc: Sequence[str | int], root: type[BaseModel] = DittuneConfig) -> type[BaseModel] | None:
    """The model class holding the keys at `loc`, if `loc` names a section."""
    return next((a for a in union_arms(annotation_at(loc, root)) if is_model(a)), None)


def literal_values(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values if the annotation is (an optional) `Literal`."""
    for arm in union_arms(annotation):
        if get_origin(arm) is Literal:
            return get_args(arm)
    return None


def schema_keys(root: type[BaseModel] = DittuneConfig, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of the schema, sections included, in declaration order."""
    paths: list[tuple[str, ...]] = []
    for name, field in root.model_fields.items():
        path = (*prefix, name)
        paths.append(path)
        section = next((a for a in union_arms(field.annotation) if is_model(a)), None)
        if section is not None:
            paths.extend(schema_keys(section, path))
    return paths


# --- pydantic errors -> problems --------------------------------------------------------------


def format_loc(loc: Sequence[str | int]) -> str:
    """`("train", "trackers", 0)` → `train.trackers[0]`."""
    out = ""
    for key in loc:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _section_label(loc: Sequence[str | int]) -> str:
    return f"[{format_loc(loc)}]" if loc else "the top level"


def unknown_key_message(loc: Sequence[str | int], root: type[BaseModel] = DittuneConfig) -> str:
    """ "unknown key" plus the likeliest intended keys: same level, or the same name in another section."""
    key, parent = loc[-1], tuple(loc[:-1])
    model = model_at(parent, root)
    if not isinstance(key, str) or model is None:
        return "unknown key."
    own = difflib.get_close_matches(key, list(model.model_fields), n=3, cutoff=0.6)
    others = [p for p in schema_keys(root) if p[:-1] != parent]
    elsewhere = [".".join(p) for p in others if p[-1] == key]
    if not own and not elsewhere:
        names = {".".join(p): p[-1] for p in others}
        close = difflib.get_close_matches(key, sorted(set(names.values())), n=2, cutoff=0.75)
        elsewhere = [dotted for dotted, name in names.items() if name in close]
    suggestions = elsewhere + [repr(name) for name in own]
    if not suggestions:
        return f"unknown key in {_section_label(parent)} (`dittune config docs` lists every option)."
    if len(suggestions) == 1:
        return f"unknown key. Did you mean {suggestions[0]}?"
    return f"unknown key. Did you mean {', '.join(suggestions[:-1])} or {suggestions[-1]}?"


def _missing_message(loc: Sequence[str | int], root: type[BaseModel]) -> str:
    section = model_at(loc, root)
    if section is not None:
        required = [name for name, field in section.model_fields.items() if field.is_required()]
        needs = f" (required keys: {', '.join(required)})" if required else ""
        return f"required section {_section_label(loc)} is missing{needs}"
    parent = model_at(loc[:-1], root)
    field = parent.model_fields.get(str(loc[-1])) if parent is not None else None
    if field is not None and field.description:
        return f"required key is missing — {field.description}"
    return "required key is missing"


def _problem(error: dict[str, Any], root: type[BaseModel]) -> Problem:
    kind, loc, value = error["type"], tuple(error["loc"]), error.get("input")
    path = format_loc(loc)
    if kind == "extra_forbidden":
        return Problem(path, unknown_key_message(loc, root))
    if kind == "missing":
        return Problem(path, _missing_message(loc, root))
    if kind == "literal_error":
        allowed = literal_values(annotation_at(loc, root))
        choices = ", ".join(map(repr, allowed)) if allowed else error.get("ctx", {}).get("expected", "?")
        return Problem(path, f"expected one of {choices}, got {_show(value)}")
    if kind in _EXPECTED:
        return Problem(path, f"expected {_EXPECTED[kind]}, got {_show(value)} ({type(value).__name__})")
    message = str(error["msg"])
    if kind in ("value_error", "assertion_error"):
        message = re.sub(r"^(Value|Assertion) error, ", "", message)
        match = _PATH_PREFIX.match(message)
        if match and (not loc or match.group(1).startswith(path)):
            return Problem(match.group(1), match.group(2))
        return Problem(path, message)
    message = message[:1].lower() + message[1:]
    return Problem(path, f"{message}, got {_show(value)}")


def problems_from_validation_error(exc: ValidationError, root: type[BaseModel] = DittuneConfig) -> list[Problem]:
    """Every error of a pydantic `ValidationError` as a `Problem`, in schema order."""
    return list(dict.fromkeys(_problem(dict(e), root) for e in exc.errors(include_url=False)))
