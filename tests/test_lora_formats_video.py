"""LoRA formats of the video families: LTX-Video (ComfyUI names over Lightricks modules), CogVideoX (VideoX-Fun's
kohya names over diffusers modules) and Wan (musubi's kohya and ComfyUI names over Wan modules).

As in tests/test_lora_formats.py: exact round trips, and a converted file merged into original-layout weights
the way ComfyUI does must give our LoRA's denoiser output. Independent of our own maps: diffusers' single-file
converters turn our original-layout checkpoints back into the diffusers weights (LTX-Video, Wan, Wan
image-to-video), and the stock `WanPipeline.load_lora_weights` (diffusers' importers of ComfyUI and musubi Wan
files) applies our converted files with the same effect as ours.
"""

from __future__ import annotations

import re
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ltx_transformer_checkpoint_to_diffusers,
    convert_wan_transformer_to_diffusers,
)
from safetensors.torch import load_file, save_file
from tests.test_lora_formats import Trained, _denoiser_output, _merge_as_comfyui
from torch import nn

from dittune.export.lora_convert import FamilyUnknown, convert_lora, describe_lora, resolve_lora
from dittune.export.lora_file import LoraInfo, read_lora, save_lora
from dittune.lora import load_lora
from dittune.models.layout_convert import from_theirs_state, to_theirs_state
from dittune.models.lora import inject_lora, lora_state_dict
from dittune.models.registry import spec_class

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {"ltx-video": ("comfyui",), "cogvideox": ("kohya",), "wan": ("kohya", "comfyui")}
"""family → the foreign formats it writes."""
PAIRS = [(family, to) for family, formats in CASES.items() for to in formats]


@pytest.fixture(scope="module")
def trained(video_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    out = tmp_path_factory.mktemp("video-loras")
    return {family: Trained(video_models[family], family, out) for family in CASES}


def _lora_on(spec, targets: list[str], rank: int, alpha: float, path: Path, seed: int) -> tuple[nn.Module, Path]:
    """The tiny denoiser with a random LoRA on exactly `targets`, and that LoRA saved as a dittune file."""
    model = spec.load_denoiser(torch.float32).eval()
    inject_lora(model, rank=rank, alpha=alpha, targets=targets)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    info = LoraInfo(family=spec.family, component=spec.denoiser_component, rank=rank, alpha=alpha, targets=targets)
    return model, save_lora(path, lora_state_dict(model), info)


@pytest.mark.parametrize(("family", "to"), PAIRS)
def test_round_trip_is_exact(trained: dict[str, Trained], tmp_path: Path, family: str, to: str) -> None:
    case = trained[family]
    foreign, _ = convert_lora(case.path, tmp_path / "lora.safetensors", to)
    back, _ = convert_lora(foreign, tmp_path / "back.safetensors", "diffusers")
    want_state, want_info = read_lora(case.path)
    got_state, got_info = read_lora(back)
    assert got_state.keys() == want_state.keys()
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    assert (got_info.rank, got_info.alpha, got_info.targets) == (want_info.rank, want_info.alpha, want_info.targets)


@pytest.mark.parametrize(("family", "to"), PAIRS)
def test_converted_lora_on_original_layout_matches(
    trained: dict[str, Trained], tmp_path: Path, family: str, to: str
) -> None:
    case = trained[family]
    layout = case.spec.original_layout()
    naming = case.spec.lora_formats()[to].naming
    converted, _ = convert_lora(case.path, tmp_path / "lora.safetensors", to)
    original = to_theirs_state(case.base_state, layout)
    # CogVideoX's LoRA tools use diffusers names: its layout renames nothing, the kohya flattening is the test
    assert (set(original) == set(case.base_state)) == (family == "cogvideox")
    merged = _merge_as_comfyui(original, converted, naming)
    model = case.spec.load_denoiser(torch.float32).eval()
    model.load_state_dict(from_theirs_state(merged, layout), strict=True)
    want = _denoiser_output(case.spec, case.model)
    plain = _denoiser_output(case.spec, case.base)
    assert (want - plain).abs().max() > 1e-2, "the LoRA changes nothing"
    torch.testing.assert_close(_denoiser_output(case.spec, model), want, atol=2e-5, rtol=1e-4)


def test_original_checkpoints_convert_back_with_diffusers(trained: dict[str, Trained]) -> None:
    """diffusers' own single-file converters read our original-layout checkpoints as the diffusers weights (Wan
    also with the image-to-video modules: k_img/v_img/norm_k_img, img_emb)."""
    wan = trained["wan"].spec.load_denoiser(torch.float32)
    config = {**wan.config, "image_dim": 16, "added_kv_proj_dim": 24}
    wan_i2v = type(wan).from_config(config).state_dict()
    checks = [
        ("ltx-video", trained["ltx-video"].base_state, convert_ltx_transformer_checkpoint_to_diffusers),
        ("wan", trained["wan"].base_state, convert_wan_transformer_to_diffusers),
        ("wan", wan_i2v, convert_wan_transformer_to_diffusers),
    ]
    for family, state, convert in checks:
        layout = trained[family].spec.original_layout()
        theirs = to_theirs_state(state, layout)
        back = convert({f"model.diffusion_model.{k}": v for k, v in theirs.items()})
        assert back.keys() == state.keys(), set(back) ^ set(state)
        assert all(torch.equal(back[k], state[k]) for k in state)
        ours = from_theirs_state(theirs, layout)
        assert ours.keys() == state.keys() and all(torch.equal(ours[k], state[k]) for k in state)
    assert "blocks.0.cross_attn.k_img.weight" in to_theirs_state(wan_i2v, trained["wan"].spec.original_layout())


def test_wan_files_load_in_the_stock_pipeline(trained: dict[str, Trained], tmp_path: Path) -> None:
    """diffusers' importers of ComfyUI and musubi Wan LoRAs (block adapters: they refuse `.alpha` on the embedders
    and head, and musubi's takes blocks only) apply our converted files as we do, alpha included."""
    spec = trained["wan"].spec
    blocks = [n for n, m in trained["wan"].base.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    model, path = _lora_on(spec, blocks, rank=4, alpha=3.0, path=tmp_path / "blocks.safetensors", seed=2)
    want = _denoiser_output(spec, model)
    assert (want - _denoiser_output(spec, trained["wan"].base)).abs().max() > 1e-2, "the LoRA changes nothing"
    for to in ("comfyui", "kohya"):
        converted, _ = convert_lora(path, tmp_path / f"{to}.safetensors", to)
        pipeline = diffusers.WanPipeline.from_pretrained(spec.path, torch_dtype=torch.float32)
        pipeline.load_lora_weights(str(converted))
        torch.testing.assert_close(_denoiser_output(spec, pipeline.transformer.eval()), want, atol=2e-5, rtol=1e-4)


def test_diffusers_names_shared_by_ltx_and_cogvideox_need_the_family(
    video_models: dict[str, Path], tmp_path: Path
) -> None:
    """A diffusers-named file without dittune metadata (finetrainers, diffusers scripts) on self-attention only fits
    both families: resolving asks for --family; `load_lora` takes the pipeline's."""
    ltx = spec_class("ltx-video")(video_models["ltx-video"])
    targets = [f"transformer_blocks.{i}.attn1.{m}" for i in (0, 1) for m in ("to_q", "to_k", "to_v", "to_out.0")]
    model, path = _lora_on(ltx, targets, rank=4, alpha=4.0, path=tmp_path / "ours.safetensors", seed=3)
    foreign = tmp_path / "foreign.safetensors"
    save_file(load_file(path), foreign)  # the same tensors, no metadata (alpha = rank, as diffusers assumes)
    with pytest.raises(FamilyUnknown, match="fits several families") as error:
        resolve_lora(foreign)
    assert "ltx-video" in str(error.value) and "cogvideox" in str(error.value)
    assert resolve_lora(foreign, "cogvideox").family == "cogvideox"
    pipeline = diffusers.LTXPipeline.from_pretrained(ltx.path, torch_dtype=torch.float32)
    plain = _denoiser_output(ltx, pipeline.transformer.eval())
    load_lora(pipeline, foreign)
    want = _denoiser_output(ltx, model)
    assert (want - plain).abs().max() > 1e-2, "the LoRA changes nothing"
    torch.testing.assert_close(_denoiser_output(ltx, pipeline.transformer.eval()), want, atol=2e-5, rtol=1e-4)


def test_foreign_kohya_cogvideox_file_is_detected(trained: dict[str, Trained], tmp_path: Path) -> None:
    """A VideoX-Fun-style kohya file without dittune metadata: CogVideoX from its module names (only CogVideoX
    has lora_unet_ names over diffusers modules), diffusers names in the key map."""
    tensors = load_file(convert_lora(trained["cogvideox"].path, tmp_path / "ours.safetensors", "kohya")[0])
    assert "lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, foreign)
    lora = resolve_lora(foreign)
    assert (lora.family, lora.format, lora.family_from) == ("cogvideox", "kohya", "module names")
    assert set(lora.modules) == set(read_lora(trained["cogvideox"].path)[1].targets)
    assert re.search(
        r"transformer_blocks\.\{i\}\.norm1\.linear +→ transformer_blocks\.\{i\}\.norm1\.linear", describe_lora(foreign)
    )


def test_formats_a_family_lacks_are_refused(trained: dict[str, Trained], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no kohya format.*available: diffusers, comfyui"):
        convert_lora(trained["ltx-video"].path, tmp_path / "x.safetensors", "kohya")
    with pytest.raises(ValueError, match=r"no comfyui format.*available: diffusers, kohya"):
        convert_lora(trained["cogvideox"].path, tmp_path / "x.safetensors", "comfyui")
