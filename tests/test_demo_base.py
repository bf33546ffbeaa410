"""The committed demo base (demo/base): complete, small, built as its card says, and it follows prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from dittune.demo.base import BASE_COLOURS, BASE_SHAPES, BASE_SIZES, NEW_CONCEPT, held_out_combinations
from dittune.demo.evaluate import generate, jobs_for, load_pipeline, measure, summarise
from dittune.demo.shapes import make_shapes_dataset
from dittune.models.hunyuan_dit.spec import HunyuanDiTSpec

BASE = Path(__file__).resolve().parents[1] / "demo" / "base"


def test_base_is_complete_small_and_documented() -> None:
    weights = sorted(BASE.rglob("*.safetensors"))
    assert {p.parent.name for p in weights} == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    assert sum(p.stat().st_size for p in weights) <= 25 * 10**6
    assert not list(BASE.rglob("*.bin"))
    info = HunyuanDiTSpec(BASE).inspect()
    assert info.version == "v1.2" and not info.warnings

    card = (BASE / "README.md").read_text(encoding="utf-8")
    assert "python scripts/build_demo_base.py WORK --install demo/base" in card
    build = json.loads((BASE / "build.json").read_text())
    assert f"{build['accuracy']:.1%}" in card
    config = tomllib.loads((BASE / "base.toml").read_text(encoding="utf-8"))
    assert config["train"]["method"] == "full" and config["train"]["init"] == "random"
    assert config["train"]["max_steps"] == build["steps"]


def test_held_out_combinations_never_reach_the_training_data(tmp_path: Path) -> None:
    held = held_out_combinations()
    assert len(held) == 2 * len(BASE_COLOURS) and len(set(held)) == len(held)
    assert {fill for fill, _, _ in held} == set(BASE_COLOURS)
    assert all(shape in BASE_SHAPES and shape != NEW_CONCEPT for _, shape, _ in held)
    out = make_shapes_dataset(tmp_path, 400, 0, BASE_SIZES, BASE_SHAPES, BASE_COLOURS, bilingual=True, exclude=held)
    english = [p.read_text().split() for p in sorted(out.glob("*.txt"))[::2]]
    seen = {(words[1], words[2], words[5]) for words in english}
    assert not seen & set(held)


@pytest.fixture(scope="module")
def held_out_summary() -> dict[str, float]:
    """Held-out combinations × {English, Chinese} × 3 unseen seeds, read with `dittune.demo.measure`."""
    jobs = jobs_for(held_out_combinations())
    spec, pipeline = load_pipeline(BASE)
    return summarise(measure(generate(spec, pipeline, jobs), jobs))


@pytest.mark.slow
def test_base_meets_the_issue_target(held_out_summary) -> None:
    """Issue 3: ≥ 80 % colour accuracy on held-out prompts and seeds; English and Chinese within 10 points."""
    summary = held_out_summary
    assert summary["samples"] == 96
    assert summary["colour_accuracy"] >= 0.80, summary
    assert abs(summary["colour_accuracy_en"] - summary["colour_accuracy_zh"]) <= 0.10, summary


@pytest.mark.slow
def test_base_scores_what_its_card_records(held_out_summary) -> None:
    """The card's numbers are reproducible (a few flipped images allowed across CPUs and thread counts)."""
    recorded = json.loads((BASE / "build.json").read_text())
    assert recorded["verdict"] == "met"
    for key, field in (("colour_accuracy", "accuracy"), ("colour_accuracy_en", "accuracy_en")):
        assert abs(held_out_summary[key] - recorded[field]) <= 0.05, (held_out_summary, recorded)
