"""LoRA injection on configurable targets (peft), the same in training and in `load_lora`."""

from __future__ import annotations

import pytest
import torch
from diffusers import HunyuanDiT2DModel

from dittune.models.hunyuan_dit.spec import HunyuanDiTSpec
from dittune.models.lora import inject_lora, lora_parameters, lora_state_dict


@pytest.fixture
def transformer(tiny_models) -> HunyuanDiT2DModel:
    return HunyuanDiT2DModel.from_pretrained(tiny_models["v1.2"] / "transformer")


def _adapted(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".lora_", 1)[0] for name, _ in model.named_parameters() if ".lora_" in name}


def test_default_targets_are_the_attention_projections(transformer):
    names = inject_lora(transformer, rank=4, alpha=4.0, targets=HunyuanDiTSpec.default_lora_targets)
    blocks = len(transformer.blocks)
    assert len(names) == blocks * 8  # attn1 and attn2: to_q, to_k, to_v, to_out.0
    assert _adapted(transformer) == set(names)
    assert not any("pooler" in n or ".ff." in n for n in names)
    # B starts at zero: the adapted model computes exactly what the base did
    assert all(torch.count_nonzero(v) == 0 for k, v in lora_state_dict(transformer).items() if "lora_B" in k)


def test_custom_targets_adapt_only_those_modules(transformer):
    names = inject_lora(transformer, rank=2, alpha=1.0, targets=["ff.net.0.proj", "attn2.to_k"])
    assert sorted(names) == sorted(
        [f"blocks.{i}.ff.net.0.proj" for i in range(4)] + [f"blocks.{i}.attn2.to_k" for i in range(4)]
    )
    assert all(p.shape[0] == 2 or p.shape[1] == 2 for p in lora_parameters(transformer))


def test_targets_matching_nothing_are_refused(transformer):
    with pytest.raises(ValueError, match="match no module"):
        inject_lora(transformer, rank=2, alpha=2.0, targets=["Wqkv"])
