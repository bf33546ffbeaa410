"""LoRA formats: exact round trips, and converted files applied to original-layout weights as ComfyUI does.

The original-layout model of a family is its tiny diffusers weights converted with the family's checkpoint
`Layout`. A converted LoRA is merged into those weights the way ComfyUI and sd-scripts apply a file (the key map
built from the checkpoint's own weight names, scale = alpha / rank, 1 without alpha); converted back, the merged
model's output must equal our LoRA's on the diffusers model. So a wrong fusion, row order, alpha or name fails
here even though the same layout builds the original weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from dittune.export.lora_convert import convert_lora, describe_lora, resolve_lora
from dittune.export.lora_file import LoraInfo, read_lora, save_lora
from dittune.models.layout_convert import from_theirs_state, to_theirs_state
from dittune.models.lora import inject_lora, lora_state_dict
from dittune.models.registry import spec_class
from tests.family_batches import encoded_batch

CASES = {
    "hunyuan-dit": ("official", "kohya", "comfyui"),
    "flux": ("kohya", "comfyui"),
}
"""family → the foreign formats it writes (each tested against the original layout)."""

RANK, ALPHA = 4, 2.0


def _linear_names(model: nn.Module) -> list[str]:
    """Every linear layer a LoRA acts through (Hunyuan-DiT's attention pool reads its projections' weights
    directly, so adapters there are inert in diffusers and in the official code alike)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".pooler." not in n]


class Trained:
    """A tiny model of a family, and a LoRA on every linear layer with random A and B, saved as a dittune file."""

    def __init__(self, model_dir: Path, family: str, out: Path) -> None:
        self.spec = spec_class(family)(model_dir)
        self.base = self.spec.load_denoiser(torch.float32).eval()
        self.base_state = {k: v.clone() for k, v in self.base.state_dict().items()}
        targets = _linear_names(self.base)
        model = self.spec.load_denoiser(torch.float32).eval()
        inject_lora(model, rank=RANK, alpha=ALPHA, targets=targets)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        self.model = model
        info = LoraInfo(family=family, component=self.spec.denoiser_component, rank=RANK, alpha=ALPHA, targets=targets)
        self.path = save_lora(out / f"{family}.safetensors", lora_state_dict(model), info)


@pytest.fixture(scope="module")
def trained(family_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    out = tmp_path_factory.mktemp("loras")
    return {family: Trained(family_models[family], family, out) for family in CASES}


def _denoiser_output(spec, model: nn.Module) -> torch.Tensor:
    """The denoiser's output on a real training batch (captured from the family's own loss)."""
    captured = []
    handle = model.register_forward_hook(
        lambda _m, _i, output: captured.append(output[0] if isinstance(output, tuple) else output.sample)
    )
    batch = encoded_batch(spec)
    with torch.no_grad():
        spec.compute_loss(
            model, spec.load_scheduler(), batch, torch.Generator().manual_seed(0), spec.default_loss_settings("lora")
        )
    handle.remove()
    return captured[0]


def _merge_as_comfyui(theirs: dict[str, torch.Tensor], converted: Path, naming: str) -> dict[str, torch.Tensor]:
    """Add every adapter of a converted file to the original-layout weight its key names, as ComfyUI does: the key
    map comes from the checkpoint's own 2-D weights; scale = alpha / rank (1 without alpha)."""
    if naming == "peft":
        config = json.loads((converted / "adapter_config.json").read_text())
        tensors = load_file(converted / "adapter_model.safetensors")
    else:
        config, tensors = {}, load_file(converted)
    modules = [k.removesuffix(".weight") for k, v in theirs.items() if k.endswith(".weight") and v.ndim == 2]
    prefix = {"kohya": "lora_unet_", "comfyui": "diffusion_model.", "peft": "base_model.model."}[naming]
    down, up = (".lora_down.weight", ".lora_up.weight") if naming == "kohya" else (".lora_A.weight", ".lora_B.weight")
    key_map = {prefix + (m.replace(".", "_") if naming == "kohya" else m): m for m in modules}
    merged = dict(theirs)
    used = set()
    for base, module in key_map.items():
        if base + down not in tensors:
            continue
        a, b = tensors[base + down], tensors[base + up]
        rank = a.shape[0]
        if naming == "peft":
            alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
        else:
            alpha = tensors[base + ".alpha"].item() if base + ".alpha" in tensors else rank
        merged[module + ".weight"] = merged[module + ".weight"] + (alpha / rank) * (b @ a)
        used |= {base + down, base + up, base + ".alpha"}
    assert not set(tensors) - used, f"keys that name no original weight: {sorted(set(tensors) - used)[:4]}"
    return merged


@pytest.mark.parametrize(("family", "to"), [(f, t) for f, formats in CASES.items() for t in formats])
def test_round_trip_is_exact(trained: dict[str, Trained], tmp_path: Path, family: str, to: str) -> None:
    case = trained[family]
    suffix = "" if to == "official" else ".safetensors"
    foreign, _ = convert_lora(case.path, tmp_path / f"lora{suffix}", to)
    back, _ = convert_lora(foreign, tmp_path / "back.safetensors", "diffusers")
    want_state, want_info = read_lora(case.path)
    got_state, got_info = read_lora(back)
    assert got_state.keys() == want_state.keys()
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    assert (got_info.rank, got_info.alpha, got_info.targets) == (want_info.rank, want_info.alpha, want_info.targets)
    assert got_info.extra["converted_from"] == to


@pytest.mark.parametrize(("family", "to"), [(f, t) for f, formats in CASES.items() for t in formats])
def test_converted_lora_on_original_layout_matches(
    trained: dict[str, Trained], tmp_path: Path, family: str, to: str
) -> None:
    case = trained[family]
    layout = case.spec.original_layout()
    naming = case.spec.lora_formats()[to].naming
    suffix = "" if to == "official" else ".safetensors"
    converted, _ = convert_lora(case.path, tmp_path / f"lora{suffix}", to)
    original = to_theirs_state(case.base_state, layout)
    assert set(original) != set(case.base_state), "the original layout renames nothing"
    merged = _merge_as_comfyui(original, converted, naming)
    model = case.spec.load_denoiser(torch.float32).eval()
    model.load_state_dict(from_theirs_state(merged, layout), strict=True)
    want = _denoiser_output(case.spec, case.model)
    got = _denoiser_output(case.spec, model)
    plain = _denoiser_output(case.spec, case.base)
    assert (want - plain).abs().max() > 1e-2, "the LoRA changes nothing"
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_full_checkpoint_layout_round_trip(trained: dict[str, Trained]) -> None:
    for case in trained.values():
        layout = case.spec.original_layout()
        back = from_theirs_state(to_theirs_state(case.base_state, layout), layout)
        assert back.keys() == case.base_state.keys()
        assert all(torch.equal(back[k], case.base_state[k]) for k in back)


def test_fused_adapter_has_stacked_down_and_block_diagonal_up(trained: dict[str, Trained], tmp_path: Path) -> None:
    case = trained["hunyuan-dit"]
    converted, _ = convert_lora(case.path, tmp_path / "lora.safetensors", "kohya")
    tensors = load_file(converted)
    down = tensors["lora_unet_blocks_0_attn1_Wqkv.lora_down.weight"]
    up = tensors["lora_unet_blocks_0_attn1_Wqkv.lora_up.weight"]
    assert down.shape[0] == 3 * RANK and up.shape[1] == 3 * RANK
    rows = up.shape[0] // 3
    assert not up[:rows, RANK:].any() and not up[rows : 2 * rows, :RANK].any()
    # the scale is kept: alpha grows with the rank
    assert tensors["lora_unet_blocks_0_attn1_Wqkv.alpha"].item() == pytest.approx(3 * ALPHA)
    assert tensors["lora_unet_blocks_0_attn1_out_proj.alpha"].item() == pytest.approx(ALPHA)
    with safe_open(converted, framework="pt") as handle:
        source = json.loads(handle.metadata()["dittune_source"])
    assert source["produced_by"].startswith("dittune") and source["family"] == "hunyuan-dit"


def test_foreign_files_without_metadata_are_detected_and_split(trained: dict[str, Trained], tmp_path: Path) -> None:
    """A kohya Flux file from another trainer (no dittune metadata, no .alpha): family from its module names,
    fused qkv shared-A split, scale 1."""
    from safetensors.torch import save_file

    tensors = load_file(convert_lora(trained["flux"].path, tmp_path / "ours.safetensors", "kohya")[0])
    generator = torch.Generator().manual_seed(5)
    stripped = {
        k: torch.randn(v.shape, generator=generator) if "lora_up" in k else v
        for k, v in tensors.items()
        if not k.endswith(".alpha")
    }
    foreign = tmp_path / "foreign.safetensors"
    save_file(stripped, foreign)
    lora = resolve_lora(foreign)
    assert (lora.family, lora.format, lora.family_from) == ("flux", "kohya", "module names")
    qkv = "double_blocks.0.img_attn.qkv"
    fused = lora.theirs[qkv]
    assert fused.alpha == fused.rank
    parts = [lora.modules[f"transformer_blocks.0.attn.to_{p}"] for p in "qkv"]
    torch.testing.assert_close(torch.cat([p.delta() for p in parts]), fused.delta())
    report = describe_lora(foreign)
    assert "double_blocks.{i}.img_attn.qkv" in report and "split rows of B" in report


def test_refusals_name_the_fix(trained: dict[str, Trained], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no official format.*available: diffusers, kohya, comfyui"):
        convert_lora(trained["flux"].path, tmp_path / "x", "official")
    with pytest.raises(ValueError, match="is a folder"):
        convert_lora(trained["hunyuan-dit"].path, tmp_path / "x.safetensors", "official")
    with pytest.raises(FileNotFoundError):
        resolve_lora(tmp_path / "missing.safetensors")
