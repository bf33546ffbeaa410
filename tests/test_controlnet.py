"""ControlNet training: the ControlNet built from the denoiser, its wrapper, and whole runs (resume, export, parity,
learning) on tiny Hunyuan-DiT and SD3 models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.family_batches import SpecCases, encoded_batch

from dittune.models.controlnet import ControlledDenoiser
from dittune.models.registry import spec_class

FAMILIES = ("hunyuan-dit", "sd3")


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> SpecCases:
    return SpecCases(tmp_path_factory.mktemp("controlnet-models"), lambda spec: (spec, encoded_batch(spec)))


def _loss(spec, model, batch) -> torch.Tensor:
    settings = spec.default_loss_settings("lora")
    with torch.no_grad():
        return spec.compute_loss(model, spec.load_scheduler(), batch, torch.Generator().manual_seed(0), settings).loss


@pytest.mark.parametrize("family", FAMILIES)
def test_controlnet_starts_from_the_denoiser_as_a_no_op(cases: SpecCases, family: str) -> None:
    spec, batch = cases[family]
    denoiser = spec.load_denoiser(torch.float32).eval().requires_grad_(False)
    controlnet, trainable = spec.build_controlnet(denoiser, None)
    block = spec.transformer_blocks(controlnet)[0].state_dict()
    assert all(torch.equal(v, spec.transformer_blocks(denoiser)[0].state_dict()[k]) for k, v in block.items())
    model = ControlledDenoiser(denoiser, controlnet.eval(), spec.control_argument)
    control = spec.latents_from_moments(batch.moments, torch.Generator().manual_seed(1), False).flip(-1)
    with model.condition(control):
        assert torch.equal(_loss(spec, model, batch), _loss(spec, denoiser, batch))  # zero-initialised outputs
        with torch.no_grad():
            for param in trainable:
                param.add_(torch.randn_like(param) * 0.05)
        assert not torch.equal(_loss(spec, model, batch), _loss(spec, denoiser, batch))
    names = {id(p) for p in trainable}
    frozen = [n for n, p in controlnet.named_parameters() if id(p) not in names]
    if family == "hunyuan-dit":  # as the official trainer: the embedders stay frozen
        assert frozen and all(
            n.startswith(("pos_embed", "text_embedder", "time_extra_emb", "text_emb")) for n in frozen
        )
    else:
        assert not frozen


def test_wrapper_refuses_calls_without_a_condition(cases: SpecCases) -> None:
    spec, batch = cases["sd3"]
    denoiser = spec.load_denoiser(torch.float32)
    model = ControlledDenoiser(denoiser, spec.build_controlnet(denoiser, 1)[0], spec.control_argument)
    with pytest.raises(RuntimeError, match="outside `condition"):
        _loss(spec, model, batch)


def test_families_without_a_controlnet_are_refused(family_models: dict[str, Path]) -> None:
    spec = spec_class("flux")(family_models["flux"])
    with pytest.raises(ValueError, match="has no ControlNet"):
        spec.build_controlnet(spec.load_denoiser(torch.float32), None)
    with pytest.raises(ValueError, match="one block per long skip"):
        hunyuan = spec_class("hunyuan-dit")(family_models["hunyuan-dit"])
        hunyuan.build_controlnet(hunyuan.load_denoiser(torch.float32), 5)
