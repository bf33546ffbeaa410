"""Single-file denoiser checkpoints: `model.path` naming a file, and `dittune export --to single-file|official`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import write_config

from dittune.cli.main import main
from dittune.config import load_config
from dittune.models.registry import spec_class
from dittune.train.preflight import preflight


def _state(spec) -> dict[str, torch.Tensor]:
    return spec.load_denoiser(torch.float32).state_dict()


@pytest.mark.parametrize("family", ["hunyuan-dit", "flux", "sd3"])
def test_exported_files_load_back_exactly(family_models: dict[str, Path], tmp_path: Path, family: str) -> None:
    folder = family_models[family]
    want = _state(spec_class(family)(folder))
    for to, name in (("single-file", "x.safetensors"), ("official", "x.pt")):
        assert main(["export", str(folder), "--to", to, "--out", str(tmp_path / name)]) == 0
        spec = spec_class(family)(folder, checkpoint=tmp_path / name)
        got = _state(spec)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), to
    written = load_file(tmp_path / "x.safetensors")
    fused = {
        "hunyuan-dit": "blocks.0.attn1.Wqkv.weight",
        "flux": "double_blocks.0.img_attn.qkv.weight",
        "sd3": "joint_blocks.0.x_block.attn.qkv.weight",
    }[family]
    assert fused in written and len(written) < len(want)
    # a diffusers-named single file (e.g. a saved transformer) loads as well, with a prefix, beside other components
    prefixed = tmp_path / "diffusers.safetensors"
    bundle = {f"model.diffusion_model.{k}": v.contiguous() for k, v in want.items()}
    save_file({**bundle, "first_stage_model.decoder.conv_in.weight": torch.zeros(2)}, prefixed)
    got = _state(spec_class(family)(folder, checkpoint=prefixed))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_hunyuan_version_is_detected_from_the_file(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    v11 = tmp_path / "v11.pt"
    assert main(["export", str(tiny_models["v1.1"]), "--to", "official", "--out", str(v11)]) == 0
    assert "style_embedder.weight" in torch.load(v11, weights_only=True)
    spec = spec_class("hunyuan-dit")(tiny_models["v1.1"], checkpoint=v11)
    assert spec.inspect().version == "v1.0/v1.1"
    with pytest.raises(ValueError, match=r"set model\.components to a folder of the checkpoint's version"):
        spec_class("hunyuan-dit")(tiny_models["v1.2"], checkpoint=v11).inspect()


def test_unreadable_and_mismatched_files_are_refused(family_models: dict[str, Path], tmp_path: Path) -> None:
    folder = family_models["hunyuan-dit"]
    pickle = tmp_path / "code.pt"
    torch.save({"weights": object()}, pickle)
    with pytest.raises(ValueError, match="weights_only=True"):
        spec_class("hunyuan-dit")(folder, checkpoint=pickle).load_denoiser(torch.float32)
    other = tmp_path / "flux.safetensors"
    assert main(["export", str(family_models["flux"]), "--to", "single-file", "--out", str(other)]) == 0
    with pytest.raises(ValueError, match=r"does not fit HunyuanDiT2DModel.*missing"):
        spec_class("hunyuan-dit")(folder, checkpoint=other).load_denoiser(torch.float32)


def test_config_with_a_single_file_path(family_models: dict[str, Path], tmp_path: Path, dataset: Path) -> None:
    folder = family_models["hunyuan-dit"]
    checkpoint = tmp_path / "ckpt" / "model.pt"
    assert main(["export", str(folder), "--to", "official", "--out", str(checkpoint)]) == 0
    config = write_config(tmp_path / "run.toml", folder, dataset, tmp_path / "out")
    text = config.read_text().replace(f'path = "{folder}"', f'path = "{checkpoint}"', 1)
    config.write_text(text)
    problems = preflight(load_config(config))
    assert [key for key, _ in problems] == ["model.components"]
    config.write_text(text.replace(f'path = "{checkpoint}"', f'path = "{checkpoint}"\ncomponents = "{folder}"', 1))
    cfg = load_config(config)
    assert preflight(cfg) == [] and cfg.model.folder == folder and cfg.model.checkpoint == checkpoint
    with pytest.raises(Exception, match="only for a single-file"):
        load_config(config, [f'model.path="{folder}"'])


def test_train_from_an_official_file_then_export(family_models: dict[str, Path], tmp_path: Path, dataset: Path) -> None:
    """`dittune train` on an official .pt (components from the folder), then `dittune export` of the run: the file
    holds the trained weights, in the original layout."""
    folder = family_models["hunyuan-dit"]
    checkpoint = tmp_path / "model.pt"
    assert main(["export", str(folder), "--to", "official", "--out", str(checkpoint)]) == 0
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", checkpoint, dataset, out, method="full", max_steps=2)
    config.write_text(
        config.read_text().replace(f'path = "{checkpoint}"', f'path = "{checkpoint}"\ncomponents = "{folder}"')
    )
    assert main(["train", str(config)]) == 0
    assert main(["export", str(out), "--to", "single-file"]) == 0
    exported = out / "export" / "transformer-official.safetensors"
    trained = _state(spec_class("hunyuan-dit")(out / "final"))
    got = _state(spec_class("hunyuan-dit")(folder, checkpoint=exported))
    base = _state(spec_class("hunyuan-dit")(folder))
    assert all(torch.equal(got[k], trained[k]) for k in trained)
    assert any(not torch.equal(trained[k], base[k]) for k in base), "training changed nothing"


def test_dtypes_follow_from_pretrained_and_a_config_only_folder_is_enough(
    video_models: dict[str, Path], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """bf16 from a single file keeps the modules diffusers keeps in fp32 (Wan's norms, tables, RoPE), as
    `from_pretrained` does; a components folder whose denoiser has only its config.json still detects the version."""
    import shutil

    wan = video_models["wan"]
    file = tmp_path / "wan.safetensors"
    assert main(["export", str(wan), "--to", "single-file", "--out", str(file)]) == 0
    folder = spec_class("wan")(wan).load_denoiser(torch.bfloat16)
    single = spec_class("wan")(wan, checkpoint=file).load_denoiser(torch.bfloat16)
    want = {k: v.dtype for k, v in folder.state_dict().items()}
    assert {k: v.dtype for k, v in single.state_dict().items()} == want
    assert torch.float32 in want.values() and torch.bfloat16 in want.values()
    assert [b.dtype for b in single.buffers()] == [b.dtype for b in folder.buffers()]

    v11 = tmp_path / "v11.pt"
    assert main(["export", str(tiny_models["v1.1"]), "--to", "official", "--out", str(v11)]) == 0
    components = shutil.copytree(tiny_models["v1.1"], tmp_path / "components")
    for weights in (components / "transformer").glob("*.safetensors"):
        weights.unlink()
    assert spec_class("hunyuan-dit")(components, checkpoint=v11).inspect().version == "v1.0/v1.1"
