"""`dittune lora convert|inspect` and `dittune sample --lora` with every format, through the command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.conftest import read_image
from tests.test_lora_formats import Trained

from dittune.cli.main import main


@pytest.fixture(scope="module")
def hunyuan(family_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return Trained(family_models["hunyuan-dit"], "hunyuan-dit", tmp_path_factory.mktemp("lora-cli"))


def test_convert_and_inspect(hunyuan: Trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    official = tmp_path / "official"
    assert main(["lora", "convert", str(hunyuan.path), str(official), "--to", "official"]) == 0
    assert (official / "adapter_config.json").is_file() and (official / "adapter_model.safetensors").is_file()
    assert "wrote" in capsys.readouterr().out
    assert main(["lora", "inspect", str(official)]) == 0
    report = capsys.readouterr().out
    assert "format:   official (peft keys)" in report
    assert "family:   hunyuan-dit" in report
    assert "blocks.{i}.attn1.Wqkv" in report and "A stacked, B block-diagonal" in report
    assert "rank:     4, 12" in report or "rank:     12 ×" in report or "rank:     4 ×" in report
    kohya = tmp_path / "kohya.safetensors"
    assert main(["lora", "convert", str(official), str(kohya), "--to", "kohya"]) == 0
    assert main(["lora", "inspect", str(kohya)]) == 0
    assert "format:   kohya" in capsys.readouterr().out


def test_bad_input_is_a_usage_error(hunyuan: Trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["lora", "inspect", str(tmp_path / "none.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["lora", "convert", str(hunyuan.path), str(tmp_path / "x.bin"), "--to", "kohya"]) == 2
    assert "one .safetensors file" in capsys.readouterr().err


def test_sample_with_each_format_gives_the_same_image(hunyuan: Trained, tmp_path: Path) -> None:
    """The same LoRA in four formats samples the same image through `dittune sample --lora`; without it, another."""
    files = {"diffusers": hunyuan.path}
    for to in ("official", "kohya", "comfyui"):
        out = tmp_path / (to if to == "official" else f"{to}.safetensors")
        assert main(["lora", "convert", str(hunyuan.path), str(out), "--to", to]) == 0
        files[to] = out
    base = ["sample", "--model", str(hunyuan.spec.path), "--prompt", "a red circle", "--steps", "2"]
    base += ["--width", "32", "--height", "32", "--precision", "fp32", "--guidance", "1"]
    images = {}
    for name, lora in files.items():
        out = tmp_path / f"{name}.png"
        assert main([*base, "--lora", str(lora), "--out", str(out)]) == 0
        images[name] = read_image(out).astype(np.int16)
    assert main([*base, "--out", str(tmp_path / "plain.png")]) == 0
    plain = read_image(tmp_path / "plain.png").astype(np.int16)
    for name, image in images.items():
        assert np.abs(image - images["diffusers"]).max() <= 1, name
    assert np.abs(plain - images["diffusers"]).mean() > 1
