"""final/README.md: the Hugging Face model card (front matter, trigger words, usage, settings, validation grid).

The card a real run writes is checked in tests/test_train_e2e.py::test_train_produces_outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dittune.config.schema import DittuneConfig
from dittune.export.model_card import derive_trigger_words, hub_model_id, write_model_card

SETTINGS = {
    "train": {
        "batch_size": 2,
        "gradient_accumulation_steps": 3,
        "learning_rate": 5e-5,
        "lr_scheduler": "cosine",
        "optimizer": "adamw8bit",
        "seed": 7,
        "mixed_precision": "auto",
    },
    "data": {"resolution": 512, "resolution_type": "pixel", "frames": None},
    "lora": {"rank": 8, "alpha": None, "targets": None},
}


def split_card(path: Path) -> tuple[dict, str]:
    """(front matter, body) of a model card."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_lora_card(tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    Image.new("RGB", (16, 8), (200, 10, 10)).save(grid)
    final = tmp_path / "my-run" / "final"
    path = write_model_card(
        final,
        base_model="/models/hub/models--stabilityai--stable-diffusion-3.5-medium/snapshots/abc123",
        family="sd3",
        family_name="SD3",
        method="lora",
        config=SETTINGS,
        steps=1200,
        trigger_words=["ohwx", "teapot"],
        validation_prompts=["ohwx teapot on a table", "a plain teapot"],
        grid=grid,
        processes=2,
        precision="bf16",
        lora_targets=["to_q", "to_k"],
        samples=24,
    )
    assert path == final / "README.md"
    front, body = split_card(path)
    assert front["base_model"] == "stabilityai/stable-diffusion-3.5-medium"
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "text-to-image"
    assert front["license"] == "other" and front["license_name"]
    assert front["tags"] == ["lora", "text-to-image", "diffusers", "dittune", "sd3"]
    assert front["instance_prompt"] == "ohwx teapot"
    assert "`ohwx`, `teapot`" in body
    assert (final / "validation.png").read_bytes() == grid.read_bytes()
    assert "![validation grid](validation.png)" in body and "- `01` a plain teapot" in body
    assert 'dittune.load_lora(pipeline, "lora.safetensors")' in body
    assert "--lora lora.safetensors --prompt 'ohwx teapot on a table' --out sample.png" in body
    for row in (
        "| LoRA rank / alpha | 8 / 8 |",
        "| LoRA targets | `to_q`, `to_k` |",
        "| steps | 1200 |",
        "| global batch | 12 (2 × 3 accumulation × 2 process(es)) |",
        "| learning rate | 5e-05 (cosine) |",
        "| optimizer | adamw8bit |",
        "| precision | bf16 |",
        "| resolution | 512 px (short edge) |",
        "| seed | 7 |",
    ):
        assert row in body, row
    assert not list(final.glob(".*"))  # no temporary files left


def test_full_video_card_from_the_config_object(tmp_path: Path) -> None:
    """The pydantic config is accepted; a clip's grid keeps its suffix; the usage loads this folder."""
    config = DittuneConfig.model_validate(
        {
            "output_dir": str(tmp_path / "run"),
            "model": {"family": "ltx-video", "path": str(tmp_path / "base")},
            "data": {"path": str(tmp_path / "data"), "resolution": 0.25, "resolution_type": "area", "frames": 17},
            "train": {"method": "full", "max_steps": 3},
        },
        strict=False,
    )
    grid = tmp_path / "grid.gif"
    frames = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(grid, save_all=True, append_images=frames[1:])
    final = tmp_path / "run" / "final"
    write_model_card(
        final,
        base_model=tmp_path / "base",
        family="ltx-video",
        family_name="LTX-Video",
        method="full",
        config=config,
        steps=3,
        trigger_words=[],
        grid=grid,
        task="text-to-video",
    )
    front, body = split_card(final / "README.md")
    assert front["base_model"] == str(tmp_path / "base")
    assert front["tags"] == ["text-to-video", "diffusers", "dittune", "ltx-video"]
    assert front["pipeline_tag"] == "text-to-video" and "instance_prompt" not in front
    assert (final / "validation.gif").read_bytes() == grid.read_bytes()
    assert "![validation grid](validation.gif)" in body
    assert 'DiffusionPipeline.from_pretrained("."' in body and "export_to_video(frames" in body
    assert "dittune sample --model . --prompt" in body and "LoRA" not in body
    assert "| resolution | 0.25 MP (area) |" in body and "| frames | 17 |" in body
    assert "None: no word" in body  # no trigger words, said so


def test_card_replaces_a_hard_link_without_touching_its_other_name(tmp_path: Path) -> None:
    """A full fine-tune's folder hard-links the base model's files, README.md included: the card must not write
    through the link into the base model."""
    base_readme = tmp_path / "base" / "README.md"
    base_readme.parent.mkdir()
    base_readme.write_text("the base model's card\n")
    final = tmp_path / "final"
    final.mkdir()
    os.link(base_readme, final / "README.md")
    write_model_card(
        final, base_model="base", family="f", family_name="F", method="full", config=SETTINGS, steps=1, grid=None
    )
    assert base_readme.read_text() == "the base model's card\n"
    _, body = split_card(final / "README.md")
    assert "## Validation" not in body and "## Training settings" in body


def test_front_matter_survives_awkward_words(tmp_path: Path) -> None:
    words = ["sks:", "#1", "dog's", "'quoted'", "中文"]
    common = {"family": "f", "family_name": "F", "config": SETTINGS, "steps": 1}
    write_model_card(tmp_path, base_model="a: b", method="lora", trigger_words=words, **common)
    front, _ = split_card(tmp_path / "README.md")
    assert front["instance_prompt"] == " ".join(words) and front["base_model"] == "a: b"


def test_method_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="method"):
        write_model_card(
            tmp_path, base_model="b", family="f", family_name="F", method="dreambooth", config=SETTINGS, steps=1
        )


def test_trigger_words_are_the_words_most_captions_share() -> None:
    captions = [
        "a photo of ohwx Teapot on a table",
        "ohwx teapot, steaming",
        "the OHWX teapot in the snow.",
        "ohwx teapot next to a cup",
        "a table in the snow",  # 4 of 5 captions (80 %) have ohwx and teapot; "table" and "snow" only 2
    ]
    assert derive_trigger_words(captions) == ["ohwx", "Teapot"]
    every = ["photo", "ohwx", "Teapot", "table", "steaming", "snow", "next", "cup"]  # in order of appearance
    assert derive_trigger_words(captions, share=0.2) == every
    assert derive_trigger_words(captions, share=0.2, limit=3) == ["photo", "ohwx", "Teapot"]
    assert derive_trigger_words([*captions[:3], "a cup", "a mug"]) == []  # 3 of 5: 60 %
    assert derive_trigger_words(["a red circle", "a blue circle", "a circle, 2"]) == ["circle"]  # no stop words
    assert derive_trigger_words(["the sks dog"]) == []  # one caption shares nothing with others
    assert derive_trigger_words([]) == []
    assert derive_trigger_words(["圆环 红色", "圆环 蓝色"]) == ["圆环"]


def test_hub_model_id() -> None:
    assert hub_model_id("/c/hub/models--Tencent-Hunyuan--HunyuanDiT-v1.2-Diffusers/snapshots/0a1b") == (
        "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers"
    )
    assert hub_model_id(Path("/data/models/sd3")) == "/data/models/sd3"
