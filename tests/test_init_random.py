"""`train.init = "random"`: full training from the config's architecture, seeded, ignoring the weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_config
from dittune.cli.main import main
from dittune.config.load import load_config
from dittune.models.hunyuan_dit.spec import HunyuanDiTSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(seed: int, path) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return HunyuanDiTSpec(path).load_denoiser(torch.float32, random_init=True).state_dict()


def test_random_init_is_seeded_and_ignores_the_weights(tiny_models) -> None:
    path = tiny_models["v1.2"]
    stored = load_file(path / "transformer" / "diffusion_pytorch_model.safetensors")
    a, b, c = _weights(1, path), _weights(1, path), _weights(2, path)
    assert a.keys() == stored.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert any(not torch.equal(a[k], stored[k]) for k in a if a[k].numel() > 1)


def test_run_starts_from_the_seeded_random_init(tmp_path, tiny_models, dataset) -> None:
    path = tiny_models["v1.2"]
    cfg = write_config(
        tmp_path / "cfg.toml", path, dataset, tmp_path / "run",
        method="full", init="random", max_steps=1, learning_rate=1e-12, seed=5, max_grad_norm=1.0,
    )  # fmt: skip
    assert main(["train", str(cfg)]) == 0
    final = load_file(tmp_path / "run" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    expected = _weights(5, path)
    # one step at lr 1e-12 moves no weight measurably: the run began at the seed-5 initialisation
    assert all(torch.allclose(final[k], expected[k], atol=1e-9) for k in expected)


def test_random_init_needs_full_training(tmp_path, tiny_models, dataset) -> None:
    cfg = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], dataset, tmp_path / "run", init="random")
    with pytest.raises(Exception, match=r"train\.init.*full"):
        load_config(cfg)
