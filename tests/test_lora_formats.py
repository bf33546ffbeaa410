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
from tests.conftest import VIDEO_FAMILIES
from tests.family_batches import encoded_batch
from torch import nn

from dittune.export.lora_convert import convert_lora, describe_lora, resolve_lora
from dittune.export.lora_file import LoraInfo, read_lora, save_lora
from dittune.models.base import ModelSpec, TrainBatch
from dittune.models.layout_convert import from_theirs_state, to_theirs_state
from dittune.models.lora import inject_lora, lora_state_dict
from dittune.models.registry import spec_class, tiny_builder

CASES = {
    "hunyuan-dit": ("official", "kohya", "comfyui"),
    "flux": ("kohya", "comfyui"),
    "sd3@sd3.5-medium": ("kohya", "comfyui"),
    "hunyuan-video": ("kohya", "comfyui"),
}
"""case → the foreign formats it writes (each tested against the original layout). A case is a family (its
default tiny model) or `family@variant` (SD3.5 Medium: qk-norm and the dual attention `attn2`)."""

RANK, ALPHA = 4, 2.0


def _linear_names(model: nn.Module) -> list[str]:
    """Every linear layer a LoRA acts through (Hunyuan-DiT's attention pool reads its projections' weights
    directly, so adapters there are inert in diffusers and in the official code alike)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".pooler." not in n]


def family_of(case: str) -> str:
    return case.partition("@")[0]


def model_dir(case: str, family_models: dict[str, Path], video_models: dict[str, Path], root: Path) -> Path:
    """The tiny model folder of a case: the shared fixtures' for a family's default variant (video families from
    `video_models`), else one built in `root`."""
    family, _, variant = case.partition("@")
    if family in VIDEO_FAMILIES:
        return video_models[case]
    if not variant:
        return family_models[family]
    return tiny_builder(family)(root / case.replace("@", "-"), seed=0, variant=variant)


class Trained:
    """A tiny model of a family, and a LoRA on every linear layer with random A and B, saved as a dittune file
    (named `name`, the family by default)."""

    def __init__(self, model_dir: Path, family: str, out: Path, name: str | None = None) -> None:
        self.spec = spec_class(family)(model_dir)
        self.base = self.spec.load_denoiser(torch.float32).eval()
        self.base_state = {k: v.clone() for k, v in self.base.state_dict().items()}
        targets = _linear_names(self.base)
        model = self.spec.load_denoiser(torch.float32).eval()
        inject_lora(model, rank=RANK, alpha=ALPHA, targets=targets)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_" in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        self.model = model
        info = LoraInfo(family=family, component=self.spec.denoiser_component, rank=RANK, alpha=ALPHA, targets=targets)
        name = (name or family).replace("@", "-")
        self.path = save_lora(out / f"{name}.safetensors", lora_state_dict(model), info)


@pytest.fixture(scope="module")
def trained(
    family_models: dict[str, Path], video_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Trained]:
    out = tmp_path_factory.mktemp("loras")
    return {
        case: Trained(model_dir(case, family_models, video_models, out), family_of(case), out, case) for case in CASES
    }


_BATCHES: dict[Path, TrainBatch] = {}


def _batch(spec: ModelSpec) -> TrainBatch:
    """`encoded_batch(spec)`, encoded once per model folder (the text encoders and VAE are loaded each time)."""
    if spec.path not in _BATCHES:
        _BATCHES[spec.path] = encoded_batch(spec)
    return _BATCHES[spec.path]


def _denoiser_output(spec, model: nn.Module) -> torch.Tensor:
    """The denoiser's output on a real training batch (captured from the family's own loss)."""
    captured = []
    handle = model.register_forward_hook(
        lambda _m, _i, output: captured.append(output[0] if isinstance(output, tuple) else output.sample)
    )
    batch = _batch(spec)
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
    with pytest.raises(ValueError, match=r"no official format.*available: diffusers, kohya, comfyui"):
        convert_lora(trained["flux"].path, tmp_path / "x", "official")
    with pytest.raises(ValueError, match="is a folder"):
        convert_lora(trained["hunyuan-dit"].path, tmp_path / "x.safetensors", "official")
    with pytest.raises(FileNotFoundError):
        resolve_lora(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------ SD3 and HunyuanVideo


@pytest.mark.parametrize("variant", ["sd3", "sd3.5", "sd3.5-medium"])
def test_sd3_layout_matches_diffusers_converter(variant: str) -> None:
    """diffusers' SAI → diffusers converter (sizes read off the shapes) takes our SAI checkpoint back exactly and
    uses every key: fused qkv, SD3.5's qk-norm and dual attention, the last block's pre-only context stream."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from dittune.models.sd3.layout import LAYOUT
    from dittune.models.sd3.tiny import tiny_transformer_config

    torch.manual_seed(0)
    state = SD3Transformer2DModel(**tiny_transformer_config(variant)).state_dict()
    theirs = {f"model.diffusion_model.{k}": v for k, v in to_theirs_state(state, LAYOUT).items()}
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in theirs
    got = convert_sd3_transformer_checkpoint_to_diffusers(theirs)
    assert not theirs, f"keys the SAI layout does not have: {sorted(theirs)[:4]}"
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_hunyuan_video_layout_matches_diffusers_converter(video_models: dict[str, Path]) -> None:
    """diffusers' Tencent → diffusers converter takes our checkpoint back exactly, except the single blocks'
    `linear1`, which it splits at a hard-coded hidden size of 3072 (q, k, v, MLP: checked by the merge test)."""
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

    from dittune.models.hunyuan_video.layout import LAYOUT

    state = spec_class("hunyuan-video")(video_models["hunyuan-video"]).load_denoiser(torch.float32).state_dict()
    theirs = to_theirs_state(state, LAYOUT)
    assert "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight" in theirs
    got = convert_hunyuan_video_transformer_to_diffusers({k: v for k, v in theirs.items() if ".linear1." not in k})
    want = {k: v for k, v in state.items() if not k.startswith(("single_transformer_blocks.0.attn.to_",))}
    want = {k: v for k, v in want.items() if ".proj_mlp." not in k}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_hunyuan_video_linear1_splits_as_diffusers_at_real_size() -> None:
    """`single_blocks.{i}.linear1` at the released width (3072, 4× MLP; one input feature keeps it small): our
    split of the weight, the bias and a LoRA's B rows is diffusers' (q, k, v, MLP) for checkpoints and LoRAs."""
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

    from dittune.models.hunyuan_video.layout import LAYOUT
    from dittune.models.layout_convert import LoraModule, lora_from_theirs

    generator = torch.Generator().manual_seed(0)
    rows = 7 * 3072
    weights = {"single_blocks.0.linear1.weight": torch.randn(rows, 1, generator=generator)}
    weights["single_blocks.0.linear1.bias"] = torch.randn(rows, generator=generator)
    want = convert_hunyuan_video_transformer_to_diffusers(dict(weights))
    got = from_theirs_state(weights, LAYOUT)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    down, up = torch.randn(2, 1, generator=generator), torch.randn(rows, 2, generator=generator)
    lora = {"diffusion_model.single_blocks.0.linear1.lora_A.weight": down}
    lora["diffusion_model.single_blocks.0.linear1.lora_B.weight"] = up
    want = _convert_hunyuan_video_lora_to_diffusers(lora)
    got = lora_from_theirs({"single_blocks.0.linear1": LoraModule(down, up, 2.0)}, LAYOUT)
    assert len(got) == 4 and len(want) == 8
    for name, module in got.items():
        assert torch.equal(module.down, want[f"transformer.{name}.lora_A.weight"])
        assert torch.equal(module.up, want[f"transformer.{name}.lora_B.weight"])


def test_hunyuan_video_comfyui_lora_loads_in_diffusers(trained: dict[str, Trained], tmp_path: Path) -> None:
    """Our comfyui file, read by the stock pipeline's `load_lora_weights` (diffusers' own HunyuanVideo LoRA
    importer), changes the denoiser exactly as our LoRA does. Left out, where that importer cannot work: the single
    blocks' `linear1` (hidden size 3072 hard-coded), the refiner's fused `self_attn_qkv` and the final modulation
    (it splits and swaps lora_A's rows as if they were weight rows), and `.alpha` (unread: folded into B)."""
    from diffusers import HunyuanVideoPipeline

    case = trained["hunyuan-video"]
    converted, _ = convert_lora(case.path, tmp_path / "lora.safetensors", "comfyui")
    tensors = load_file(converted)
    unread = (".linear1.", ".self_attn_qkv.", "final_layer.adaLN_modulation.1.")
    state = {}
    for key, tensor in tensors.items():
        if key.endswith(".lora_A.weight") and not any(part in key for part in unread):
            base = key.removesuffix(".lora_A.weight")
            scale = tensors[f"{base}.alpha"].item() / tensor.shape[0]
            state[key], state[f"{base}.lora_B.weight"] = tensor, tensors[f"{base}.lora_B.weight"] * scale
    pipe = HunyuanVideoPipeline.from_pretrained(case.spec.path, torch_dtype=torch.float32)
    pipe.load_lora_weights(state)

    def left_out(name: str) -> bool:
        single_linear1 = name.startswith("single_transformer_blocks.") and ("attn.to_" in name or "proj_mlp" in name)
        refiner_qkv = "token_refiner" in name and any(f"attn.to_{p}" in name for p in "qkv")
        return single_linear1 or refiner_qkv or name.startswith("norm_out.linear")

    want_model = case.spec.load_denoiser(torch.float32).eval()
    inject_lora(want_model, rank=RANK, alpha=ALPHA, targets=_linear_names(case.base))
    with torch.no_grad():
        for name, param in want_model.named_parameters():
            if "lora_" in name:
                param.copy_(
                    torch.zeros_like(param) if "lora_B" in name and left_out(name) else case.model.get_parameter(name)
                )
    loaded = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A")}
    assert loaded == {n for n in _linear_names(case.base) if not left_out(n)}
    got = _denoiser_output(case.spec, pipe.transformer.eval())
    want = _denoiser_output(case.spec, want_model)
    assert (want - _denoiser_output(case.spec, case.base)).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("case", "naming"), [(c, n) for c in ("sd3@sd3.5-medium", "hunyuan-video") for n in ("kohya", "comfyui")]
)
def test_files_of_other_trainers_resolve_by_module_names(
    trained: dict[str, Trained], tmp_path: Path, case: str, naming: str
) -> None:
    """A file in SAI / Tencent names without dittune metadata (sd-scripts', musubi-tuner's, ComfyUI users'): the
    family is told from its module names and every fused adapter splits back to exactly our updates."""
    from safetensors.torch import save_file

    trained_case = trained[case]
    converted, _ = convert_lora(trained_case.path, tmp_path / "ours.safetensors", naming)
    foreign = tmp_path / "foreign.safetensors"
    save_file(load_file(converted), foreign)
    lora = resolve_lora(foreign)
    assert (lora.family, lora.format, lora.family_from) == (family_of(case), naming, "module names")
    want = resolve_lora(trained_case.path).modules
    assert lora.modules.keys() == want.keys()
    for name, module in want.items():
        torch.testing.assert_close(lora.modules[name].delta(), module.delta(), atol=1e-6, rtol=1e-5)


def test_hunyuan_video_attention_only_kohya_files_need_the_family(trained: dict[str, Trained], tmp_path: Path) -> None:
    """musubi-tuner's kohya names of the fused attention modules are Flux's too (`img_attn.qkv` and `img_attn_qkv`
    both flatten to `img_attn_qkv`): such a file fits both families until `--family` says which."""
    from safetensors.torch import save_file

    from dittune.export.lora_convert import FamilyUnknown

    converted, _ = convert_lora(trained["hunyuan-video"].path, tmp_path / "ours.safetensors", "kohya")
    kept = ("_img_attn_qkv.", "_txt_attn_proj.", "_linear1.", "_linear2.")
    attention = {k: v for k, v in load_file(converted).items() if any(part in k for part in kept)}
    save_file(attention, tmp_path / "attention.safetensors")
    with pytest.raises(FamilyUnknown, match=r"fits several families \(flux, hunyuan-video\); pass --family"):
        resolve_lora(tmp_path / "attention.safetensors")
    lora = resolve_lora(tmp_path / "attention.safetensors", family="hunyuan-video")
    assert "single_transformer_blocks.0.proj_mlp" in lora.modules and "transformer_blocks.0.attn.to_q" in lora.modules


def test_hunyuan_video_default_targets_leave_the_mlp_rows_of_linear1_zero(trained: dict[str, Trained]) -> None:
    """The default targets adapt the single blocks' q, k, v but not `proj_mlp`: `linear1` gets the 4× MLP rows
    as zeros, and the split gives back the three adapters."""
    from dittune.models.hunyuan_video.layout import LAYOUT
    from dittune.models.layout_convert import lora_from_theirs, lora_to_theirs

    modules = resolve_lora(trained["hunyuan-video"].path).modules
    attention = {k: v for k, v in modules.items() if k.startswith("single_transformer_blocks.0.attn.")}
    theirs, record = lora_to_theirs(attention, LAYOUT)
    fused = theirs["single_blocks.0.linear1"]
    width = attention["single_transformer_blocks.0.attn.to_q"].up.shape[0]
    assert fused.up.shape == (7 * width, 3 * RANK) and not fused.up[3 * width :].any()
    back = lora_from_theirs(theirs, LAYOUT, record)
    assert back.keys() == attention.keys()
    assert all(torch.equal(back[k].delta(), attention[k].delta()) for k in attention)


def test_peft_files_rank_stabilised_and_non_lora_kinds(trained: dict[str, Trained], tmp_path: Path) -> None:
    """peft's `use_rslora` (scale alpha / √r) is read at its scale; DoRA or LyCORIS tensors are refused, not
    silently dropped; the official config's target_modules names exactly the adapted modules."""
    import re

    from safetensors.torch import save_file

    case = trained["hunyuan-dit"]
    folder, _ = convert_lora(case.path, tmp_path / "official", "official")
    config = json.loads((folder / "adapter_config.json").read_text())
    layout = case.spec.original_layout()
    names = [k.removesuffix(".weight") for k, v in to_theirs_state(case.base_state, layout).items() if v.ndim == 2]
    adapted = {n for n in names if re.fullmatch(config["target_modules"], n)}
    assert adapted == set(resolve_lora(folder).theirs)
    config["use_rslora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(config))
    for name, module in resolve_lora(folder).theirs.items():
        wanted = config["alpha_pattern"].get(name, config["lora_alpha"]) / module.rank**0.5
        assert module.scale == pytest.approx(wanted)
    kohya = load_file(convert_lora(case.path, tmp_path / "k.safetensors", "kohya")[0])
    kohya["lora_unet_blocks_0_attn1_out_proj.dora_scale"] = torch.ones(1, 32)
    save_file(kohya, tmp_path / "dora.safetensors")
    with pytest.raises(ValueError, match=r"not plain LoRA.*DoRA"):
        resolve_lora(tmp_path / "dora.safetensors")


def test_fusion_edge_cases_keep_the_update(trained: dict[str, Trained], tmp_path: Path) -> None:
    """Parts of different ranks and scales fuse and split to the same updates; a foreign fused adapter converted
    to another foreign format keeps its rank; a fusion record that no longer fits the tensors is not trusted."""
    from dittune.models.layout_convert import LoraModule, lora_from_theirs, lora_to_theirs

    layout = trained["hunyuan-dit"].spec.original_layout()
    g = torch.Generator().manual_seed(0)
    parts = {
        "blocks.0.attn1.to_q": LoraModule(torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 16.0),
        "blocks.0.attn1.to_k": LoraModule(torch.randn(6, 32, generator=g), torch.randn(32, 6, generator=g), 16.0),
        "blocks.0.attn1.to_v": LoraModule(torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 3.0),
    }
    fused, record = lora_to_theirs(parts, layout)
    back = lora_from_theirs(fused, layout, record)
    for name, module in parts.items():
        torch.testing.assert_close(back[name].delta(), module.delta())
    stale = {k: [type(p)(p.name, p.rows, p.rank + 1, p.alpha) for p in v] for k, v in record.items()}
    for name, module in lora_from_theirs(fused, layout, stale).items():
        torch.testing.assert_close(module.delta(), parts[name].delta())
    # kohya (fused) → comfyui: the shared-A split fuses back at the same rank
    kohya = convert_lora(trained["hunyuan-dit"].path, tmp_path / "a.safetensors", "kohya")[0]
    plain = {k: v for k, v in load_file(kohya).items()}
    from safetensors.torch import save_file

    save_file(plain, tmp_path / "foreign.safetensors")  # no dittune metadata: no fusion record
    comfy = load_file(convert_lora(tmp_path / "foreign.safetensors", tmp_path / "c.safetensors", "comfyui")[0])
    assert (
        comfy["diffusion_model.blocks.0.attn1.Wqkv.lora_A.weight"].shape
        == plain["lora_unet_blocks_0_attn1_Wqkv.lora_down.weight"].shape
    )
