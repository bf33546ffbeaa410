"""Config loading: readable problems, overrides, path resolution, resolved TOML and generated docs."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel

from dittune.config import (
    ConfigError,
    DittuneConfig,
    Problem,
    config_reference_markdown,
    load_config,
    parse_override,
    resolved_toml,
    update_readme_section,
)
from dittune.config.docs import END_MARKER, START_MARKER, render_type
from dittune.config.errors import is_model, union_arms

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

GOOD = """\
output_dir = "runs/first"

[model]
family = "hunyuan-dit"
path = "models/tiny"

[data]
path = "images"
resolution = 512
resolution_type = "pixel"

[train]
max_steps = 10
"""


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


def problems_of(path: Path, overrides: tuple[str, ...] = ()) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert all(isinstance(p, Problem) for p in info.value.problems)
    return {p.path: p.message for p in info.value.problems}


# --- problems ---------------------------------------------------------------------------------


def test_good_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.train.max_steps == 10
    assert cfg.train.batch_size == 1
    assert cfg.data.resolution == 512
    assert cfg.lora.alpha is None
    assert cfg.validation.prompts == []


def test_typo_key_suggests_the_close_name(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "batch_sise = 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "train.batch_sise: unknown key. Did you mean 'batch_size'?"


def test_misplaced_key_suggests_its_section(tmp_path: Path) -> None:
    path = write(tmp_path, edit(GOOD, 'resolution_type = "pixel"', 'resolution_type = "pixel"\nmax_steps = 3'))
    assert problems_of(path) == {"data.max_steps": "unknown key. Did you mean train.max_steps?"}


def test_misspelt_section_suggests_the_section(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "\n[validaton]\nsteps = 4\n")
    assert problems_of(path)["validaton"] == "unknown key. Did you mean 'validation'?"


def test_wrong_type_names_expected_and_given(tmp_path: Path) -> None:
    path = write(tmp_path, edit(GOOD, "max_steps = 10", 'max_steps = "ten"'))
    assert problems_of(path) == {"train.max_steps": "expected an integer, got 'ten' (str)"}


def test_bad_literal_lists_the_choices(tmp_path: Path) -> None:
    path = write(tmp_path, edit(GOOD, '"pixel"', '"megapixels"'))
    assert problems_of(path) == {"data.resolution_type": "expected one of 'pixel', 'area', got 'megapixels'"}


def test_literal_inside_a_list_names_the_index(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + 'trackers = ["tensorboard", "mlflow"]\n')
    assert problems_of(path) == {"train.trackers[1]": "expected one of 'tensorboard', 'wandb', got 'mlflow'"}


def test_area_with_a_pixel_value_is_explained(tmp_path: Path) -> None:
    path = write(tmp_path, edit(GOOD, '"pixel"', '"area"'))
    problems = problems_of(path)
    assert list(problems) == ["data.resolution"]
    assert "512 megapixels" in problems["data.resolution"]
    assert not problems["data.resolution"].startswith("Value error")


def test_pixel_with_a_fraction_is_explained(tmp_path: Path) -> None:
    path = write(tmp_path, edit(GOOD, "resolution = 512", "resolution = 0.5"))
    problems = problems_of(path)
    assert list(problems) == ["data.resolution"]
    assert 'resolution_type = "area"' in problems["data.resolution"]


def test_missing_required_key_shows_its_description(tmp_path: Path) -> None:
    path = write(tmp_path, edit(GOOD, "max_steps = 10\n", "batch_size = 2\n"))
    message = problems_of(path)["train.max_steps"]
    assert message.startswith("required key is missing")
    assert DittuneConfig.model_fields["train"].annotation.model_fields["max_steps"].description in message


def test_missing_section_lists_its_required_keys(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.split("[train]")[0])
    assert problems_of(path) == {"train": "required section [train] is missing (required keys: max_steps)"}


def test_constraint_violation_is_prefixed_by_the_path(tmp_path: Path) -> None:
    path = write(tmp_path, edit(GOOD, "max_steps = 10", "max_steps = 0"))
    message = problems_of(path)["train.max_steps"]
    assert "greater than or equal to 1" in message
    assert message.endswith("got 0")


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    text = edit(GOOD, "max_steps = 10", 'max_steps = "ten"\nbatch_sise = 2')
    text = edit(text, '"pixel"', '"megapixels"')
    text = edit(text, 'family = "hunyuan-dit"\n', "")
    path = write(tmp_path, text + "\n[lora]\nrank = 1.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = {p.path for p in info.value.problems}
    assert problems == {
        "train.max_steps",
        "train.batch_sise",
        "data.resolution_type",
        "model.family",
        "lora.rank",
    }
    assert len(str(info.value).splitlines()) == 5


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, edit(GOOD, "max_steps = 10", "max_steps = = 10"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.path == str(path)
    line = GOOD.splitlines().index("max_steps = 10") + 1
    assert f"line {line}, column 13" in problem.message
    assert "invalid TOML" in problem.message


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.toml"):
        load_config(tmp_path / "nope.toml")


# --- overrides --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("train.max_steps=10", ("train", "max_steps"), 10),
        ("train.learning_rate = 3e-5", ("train", "learning_rate"), 3e-5),
        ("train.mixed_precision=bf16", ("train", "mixed_precision"), "bf16"),
        ('validation.negative_prompt="a = b"', ("validation", "negative_prompt"), "a = b"),
        ('validation.prompts=["a","b"]', ("validation", "prompts"), ["a", "b"]),
        ("train.caption_dropout_per_encoder={clip = 0.1}", ("train", "caption_dropout_per_encoder"), {"clip": 0.1}),
        ("model.family=123", ("model", "family"), "123"),  # a string option keeps the text
        ("lora.rank=8", ("lora", "rank"), 8),
    ],
)
def test_parse_override_reads_toml_values(text: str, key: tuple[str, ...], value: object) -> None:
    assert parse_override(text) == (key, value)


def test_overrides_are_applied_and_validated(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, GOOD),
        ["train.max_steps=25", "train.mixed_precision=bf16", 'validation.prompts=["a cat","a dog"]', "lora.rank=4"],
    )
    assert cfg.train.max_steps == 25
    assert cfg.train.mixed_precision == "bf16"
    assert cfg.validation.prompts == ["a cat", "a dog"]
    assert cfg.lora.rank == 4


def test_override_with_a_bad_value_is_a_problem_of_that_key(tmp_path: Path) -> None:
    assert problems_of(write(tmp_path, GOOD), ("train.max_steps=many",)) == {
        "train.max_steps": "expected an integer, got 'many' (str)"
    }


def test_override_into_a_non_table_is_refused(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, GOOD), ("train.max_steps.x=1",))
    assert problems == {"train.max_steps.x": "cannot set it: train.max_steps is 10, not a table"}


def test_override_creating_an_unknown_table_is_an_unknown_key(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, GOOD), ("train.schedule.warmup=1",))
    assert problems["train.schedule"].startswith("unknown key")


@pytest.mark.parametrize("text", ["train.max_steps", "=3", "train..max_steps=3", ".x=1"])
def test_malformed_override_explains_the_form(tmp_path: Path, text: str) -> None:
    problems = problems_of(write(tmp_path, GOOD), (text,))
    assert list(problems) == ["--set"]
    assert "dotted.key=value" in problems["--set"]


# --- paths ------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_toml_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir = tmp_path / "configs"
    path = write(config_dir, GOOD + '\n[cache]\ndir = "../shared-cache"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert cfg.output_dir == config_dir / "runs/first"
    assert cfg.model.path == config_dir / "models/tiny"
    assert cfg.data.path == config_dir / "images"
    assert cfg.cache.dir == config_dir / "../shared-cache"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    absolute = tmp_path / "abs" / "images"
    path = write(tmp_path / "configs", edit(GOOD, 'path = "images"', f"path = {str(absolute)!r}"))
    assert load_config(path).data.path == absolute


def test_override_paths_are_relative_to_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "configs", GOOD)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, ["output_dir=runs/b", "cache.dir=c"])
    assert cfg.output_dir == tmp_path / "runs/b"
    assert cfg.cache.dir == tmp_path / "c"
    assert cfg.model.path == tmp_path / "configs/models/tiny"


# --- resolved TOML ----------------------------------------------------------------------------


def test_resolved_toml_round_trips(tmp_path: Path) -> None:
    text = GOOD + textwrap.dedent(
        """
        caption_dropout_per_encoder = {clip = 0.1, "odd name" = 0.2}
        max_grad_norm = 0.5
        [lora]
        alpha = 8.0
        [validation]
        prompts = ['a "quoted" cat', "line\\nbreak", "ünïcode"]
        """
    )
    cfg = load_config(write(tmp_path, text), ["train.learning_rate=3e-6"])
    shown = resolved_toml(cfg)
    assert "# targets = (unset)" in shown
    assert "# dir = (unset)" in shown
    parsed = tomllib.loads(shown)
    assert parsed["train"]["batch_size"] == 1  # defaults are written out
    assert "dir" not in parsed["cache"]
    again = load_config(write(tmp_path / "other", shown))
    assert again == cfg


def test_resolved_toml_of_an_area_config_round_trips(tmp_path: Path) -> None:
    text = edit(edit(GOOD, "resolution = 512", "resolution = 0.25"), '"pixel"', '"area"')
    cfg = load_config(write(tmp_path, text))
    assert load_config(write(tmp_path / "again", resolved_toml(cfg))) == cfg


# --- docs -------------------------------------------------------------------------------------


def _sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    found = []
    for name, field in model.model_fields.items():
        for arm in union_arms(field.annotation):
            if is_model(arm):
                found.append((prefix + name, arm))
                found.extend(_sections(arm, f"{prefix}{name}."))
    return found


def test_docs_cover_every_field_of_every_section() -> None:
    doc = config_reference_markdown()
    chunks = doc.split("\n### ")
    by_heading = {chunk.splitlines()[0]: chunk for chunk in chunks[1:]}
    top = [n for n, f in DittuneConfig.model_fields.items() if not any(map(is_model, union_arms(f.annotation)))]
    for name in top:
        assert f"| `{name}` |" in by_heading["Top-level keys"]
    sections = _sections(DittuneConfig)
    assert len(sections) >= 8
    for dotted, model in sections:
        chunk = by_heading[f"[{dotted}]"]
        for name, field in model.model_fields.items():
            if is_model(field.annotation):
                continue
            row = next(line for line in chunk.splitlines() if line.startswith(f"| `{name}` |"))
            assert ("**required**" in row) == field.is_required()
    assert next(iter(by_heading)) == "Top-level keys"
    assert config_reference_markdown() == doc


def test_docs_render_types_readably() -> None:
    fields = {
        "data.resolution_type": '`"pixel" \\| "area"`',
        "train.max_steps": "`int` (≥ 1)",
        "lora.alpha": "`float \\| unset`",
        "validation.prompts": "`list of str`",
        "model.path": "`path`",
    }
    doc = config_reference_markdown()
    for dotted, rendered in fields.items():
        section, name = dotted.split(".")
        chunk = doc.split(f"### [{section}]")[1].split("\n### ")[0]
        row = next(line for line in chunk.splitlines() if line.startswith(f"| `{name}` |"))
        assert row.split(" | ")[1] == rendered
    assert render_type(list[str] | None) == "list of str | unset"


def test_readme_markers_are_replaced() -> None:
    readme = f"# dittune\n\nintro\n\n{START_MARKER}\nold stuff\n{END_MARKER}\n\n## License\n"
    updated = update_readme_section(readme)
    assert "old stuff" not in updated
    assert updated.startswith("# dittune\n\nintro\n\n" + START_MARKER)
    assert updated.endswith(END_MARKER + "\n\n## License\n")
    assert config_reference_markdown() in updated
    assert update_readme_section(updated) == updated


@pytest.mark.parametrize("readme", ["no markers", f"{END_MARKER}\n{START_MARKER}", f"{START_MARKER} only"])
def test_readme_without_markers_raises(readme: str) -> None:
    with pytest.raises(ValueError, match="config-reference"):
        update_readme_section(readme)
