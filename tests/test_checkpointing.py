"""Block checkpointing on a tiny real HunyuanDiT2DModel: same gradients, same keys, actually recomputes."""

from __future__ import annotations

import pytest
import torch
from diffusers import HunyuanDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed
from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid
from peft import LoraConfig, inject_adapter_in_model

from dittune.models.checkpointing import (
    disable_block_checkpointing,
    enable_block_checkpointing,
    is_checkpointing,
)

PATCH, HEADS, HEAD_DIM = 2, 2, 8


def tiny_model(style_cond: bool) -> HunyuanDiT2DModel:
    torch.manual_seed(0)
    model = HunyuanDiT2DModel(
        sample_size=8,
        patch_size=PATCH,
        in_channels=4,
        num_layers=4,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        hidden_size=HEADS * HEAD_DIM,
        cross_attention_dim=16,
        cross_attention_dim_t5=16,
        pooled_projection_dim=8,
        text_len=77,
        text_len_t5=256,
        activation_fn="gelu-approximate",
        use_style_cond_and_image_meta_size=style_cond,
    )
    return model.train()


def tiny_inputs(style_cond: bool, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    latent = 8
    grid = latent // PATCH
    mask = torch.ones(batch, 77, dtype=torch.long)
    mask[0, 12:] = 0
    mask_t5 = torch.ones(batch, 256, dtype=torch.long)
    mask_t5[1, 40:] = 0
    crops = get_resize_crop_region_for_grid((grid, grid), 512 // 8 // PATCH)
    rope = get_2d_rotary_pos_embed(HEAD_DIM, crops, (grid, grid), use_real=True, output_type="pt")
    inputs = {
        "hidden_states": torch.randn(batch, 4, latent, latent, generator=g),
        "timestep": torch.tensor([17.0, 803.0])[:batch],
        "encoder_hidden_states": torch.randn(batch, 77, 16, generator=g),
        "text_embedding_mask": mask,
        "encoder_hidden_states_t5": torch.randn(batch, 256, 16, generator=g),
        "text_embedding_mask_t5": mask_t5,
        "image_rotary_emb": rope,
    }
    if style_cond:
        inputs["image_meta_size"] = torch.tensor([[1024.0, 768, 1024, 768, 0, 0]] * batch)
        inputs["style"] = torch.zeros(batch, dtype=torch.long)
    return inputs


def grads_of(model: HunyuanDiT2DModel, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs).sample
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*_args) -> None:
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-7, rtol=0, msg=name)


@pytest.mark.parametrize("style_cond", [False, True])
def test_checkpointing_gives_equal_gradients(style_cond: bool) -> None:
    model = tiny_model(style_cond)
    inputs = tiny_inputs(style_cond)
    keys_before = list(model.state_dict())
    inner_calls = count_calls(model.blocks[3].attn1)  # block 3 takes the `skip` input
    outer_calls = count_calls(model.blocks[3])

    out_ref, grads_ref = grads_of(model, inputs)
    assert inner_calls[0] == 1 and outer_calls[0] == 1
    assert len(grads_ref) == sum(p.requires_grad for p in model.parameters())
    assert any(g.abs().sum() > 0 for n, g in grads_ref.items() if n.startswith("blocks.0."))

    enable_block_checkpointing(model.blocks)
    assert all(is_checkpointing(b) for b in model.blocks)
    assert list(model.state_dict()) == keys_before
    out_gc, grads_gc = grads_of(model, inputs)
    assert inner_calls[0] == 3, "the block's forward must be re-run during backward"
    assert outer_calls[0] == 2, "hooks on the block itself still fire once per call"
    assert torch.equal(out_gc, out_ref)
    assert_same_grads(grads_ref, grads_gc)

    # no recomputation when no graph is built or in eval mode
    with torch.no_grad():
        model(**inputs)
    model.eval()
    model(**inputs).sample.sum().backward()
    assert inner_calls[0] == 5

    disable_block_checkpointing(model.blocks)
    model.train()
    assert not any(is_checkpointing(b) for b in model.blocks)
    assert all("forward" not in b.__dict__ for b in model.blocks)
    _, grads_off = grads_of(model, inputs)
    assert inner_calls[0] == 6
    assert_same_grads(grads_ref, grads_off)


def test_checkpointing_with_injected_lora() -> None:
    model = tiny_model(style_cond=False)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    model = inject_adapter_in_model(config, model)
    torch.manual_seed(2)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_B" in name:
            with torch.no_grad():
                param.copy_(torch.randn_like(param) * 0.1)
    inputs = tiny_inputs(style_cond=False)
    keys_before = list(model.state_dict())
    assert any("blocks.2.attn1.to_q.lora_A" in k for k in keys_before)
    block_keys_before = [list(b.state_dict()) for b in model.blocks]
    calls = count_calls(model.blocks[1].attn2.to_k.lora_B["default"])

    out_ref, grads_ref = grads_of(model, inputs)
    assert grads_ref and all("lora_" in n for n in grads_ref)
    assert any(n.startswith("blocks.1.attn2.to_k.lora_B") for n in grads_ref)
    assert all(g.abs().sum() > 0 for n, g in grads_ref.items() if n.startswith("blocks."))

    enable_block_checkpointing(model.blocks)
    enable_block_checkpointing(model.blocks)  # idempotent
    assert list(model.state_dict()) == keys_before
    assert [list(b.state_dict()) for b in model.blocks] == block_keys_before
    out_gc, grads_gc = grads_of(model, inputs)
    assert calls[0] == 3
    assert torch.equal(out_gc, out_ref)
    assert_same_grads(grads_ref, grads_gc)


def test_previous_instance_forward_is_kept_and_restored() -> None:
    block = torch.nn.Linear(3, 3)
    seen: list[int] = []

    def wrapped(x: torch.Tensor) -> torch.Tensor:
        seen.append(1)
        return type(block).forward(block, x) * 2

    block.forward = wrapped
    blocks = torch.nn.ModuleList([block])
    enable_block_checkpointing(blocks)
    x = torch.randn(2, 3, requires_grad=True)
    y = block(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, block.weight, block.bias) * 2)
    y.sum().backward()
    assert len(seen) == 2  # forward, then recomputation inside backward
    disable_block_checkpointing(blocks)
    assert block.forward is wrapped
