"""The quickstart LoRA teaches the base a word it has never seen, deterministically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dittune.demo.quickstart import (
    DEFAULT_IMAGES,
    DEFAULT_STEPS,
    REPO_BASE,
    concept_eval_combinations,
    run_quickstart,
    validation_prompts,
)


def test_concept_prompts_are_held_out_and_bilingual() -> None:
    rings = concept_eval_combinations()
    assert len({fill for fill, _, _ in rings}) == len(rings) == 8
    prompts = validation_prompts()
    assert sum("ring" in p for p in prompts) == 2 and sum("圆环" in p for p in prompts) == 2


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    return out, run_quickstart(out, REPO_BASE, DEFAULT_STEPS, 0, DEFAULT_IMAGES)


@pytest.mark.slow
def test_quickstart_lora_clearly_teaches_the_new_word(quickstart) -> None:
    """Issue 3: on held-out ring prompts and unseen seeds the LoRA clearly beats the base.

    "Clearly" as documented in the README: the hollow-shape rate rises by at least 30 points and to at
    least 5× the base's, while the colour words keep working (≥ 60 %). Seeds 0–2 give 42–54 % hollow (fp32)
    against the base's 6 %; the margin allows for that spread.
    """
    out, summary = quickstart
    base, lora = summary["base"], summary["lora"]
    assert lora["hollow_rate"] >= base["hollow_rate"] + 0.30, summary
    assert lora["hollow_rate"] >= 5 * base["hollow_rate"], summary
    assert lora["colour_accuracy"] >= 0.6, summary

    assert json.loads((out / "summary.json").read_text()) == summary
    for image in ("before_after.png", "eval_base.png", "eval_lora.png", "run/loss.png"):
        with Image.open(out / image) as opened:
            assert opened.width > 200, image
    grids = sorted((out / "run" / "validation").glob("step_*/grid.png"))
    assert grids[0].parent.name == "step_00000000"
    assert grids[-1].parent.name == f"step_{DEFAULT_STEPS:08d}"
    assert "圆环" in (grids[-1].parent / "prompts.txt").read_text(encoding="utf-8")
    assert list((out / "run" / "logs").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_quickstart_is_deterministic(tmp_path: Path) -> None:
    from dittune.cli.main import main
    from dittune.demo.quickstart import config_toml, make_concept_dataset

    loras = []
    for name in ("a", "b"):
        out = tmp_path / name
        make_concept_dataset(out / "data", 16, seed=0)
        (out / "config.toml").write_text(config_toml(REPO_BASE, steps=6, seed=0), encoding="utf-8")
        assert main(["train", str(out / "config.toml"), "--set", "validation.prompts=[]"]) == 0
        loras.append(load_file(out / "run" / "final" / "lora.safetensors"))
    assert loras[0].keys() == loras[1].keys()
    assert all(torch.equal(loras[0][k], loras[1][k]) for k in loras[0])
    assert any(loras[0][k].abs().sum() > 0 for k in loras[0] if "lora_B" in k)
