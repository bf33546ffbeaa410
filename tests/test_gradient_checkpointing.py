"""`train.gradient_checkpointing_ratio`: the first ceil(r·N) transformer blocks recomputed in backward, for any
family through `ModelSpec.enable_partial_checkpointing`.

On tiny real models made 4 blocks deep per block list (LoRA, fp32): Hunyuan-DiT (dittune's own checkpointing at
every ratio), Flux (two block lists; diffusers' switch at ratio 1) and Wan (video; diffusers' switch at ratio 1).
Each ratio must give the gradients of the run without checkpointing, recompute exactly the first blocks, and
keep fewer bytes for backward the more blocks it covers — counted with autograd's saved-tensor hooks, which is
deterministic on a CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch import nn

from conftest import write_config
from dittune.config.errors import ConfigError
from dittune.config.load import validate_config
from dittune.models.base import ModelSpec, TrainBatch
from dittune.models.checkpointing import (
    SavedActivations,
    checkpointed_count,
    enable_block_checkpointing,
    is_checkpointing,
)
from dittune.models.compile import compile_blocks, is_compiled
from family_batches import SpecCases, deeper_lora_denoiser, encoded_batch

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("hunyuan-dit", "flux", "wan")
LAYERS = 4
"""Blocks per block list (Flux: 4 double- and 4 single-stream blocks)."""
RATIOS = (0.25, 0.5, 1.0)


class Case:
    """A family's tiny pipeline, a deeper LoRA denoiser built from its transformer config, and one batch."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.batch = _batch(spec)
        self.scheduler = spec.load_scheduler()
        self.model = _lora_denoiser(spec)

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def step(self, model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, list[tuple[int, int]]]:
        """Loss, LoRA gradients, bytes saved for backward and (forward, backward) calls of each block's linears."""
        blocks = self.spec.transformer_blocks(model)
        calls = [[0, 0] for _ in blocks]
        phase = [0]
        handles = [
            layer.register_forward_hook(lambda *_, i=index: calls[i].__setitem__(phase[0], calls[i][phase[0]] + 1))
            for index, block in enumerate(blocks)
            for layer in block.modules()
            if isinstance(layer, nn.Linear)
        ]
        model.zero_grad(set_to_none=True)
        settings = self.spec.default_loss_settings("lora")
        with SavedActivations(model, blocks) as saved:
            out = self.spec.compute_loss(model, self.scheduler, self.batch, torch.Generator().manual_seed(7), settings)
        phase[0] = 1
        out.loss.backward()
        for handle in handles:
            handle.remove()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return out.loss.detach(), grads, saved.bytes, [(f, b) for f, b in calls]


def _batch(spec: ModelSpec, size: int = 32) -> TrainBatch:
    return encoded_batch(spec, size)


def _lora_denoiser(spec: ModelSpec) -> nn.Module:
    return deeper_lora_denoiser(spec, LAYERS)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    """family → `Case`, built on first use."""
    return SpecCases(tmp_path_factory.mktemp("gc-models"), Case)


def assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-10, msg=name)


# ------------------------------------------------------------------------------------------ the count
@pytest.mark.parametrize(
    ("ratio", "total", "count"),
    [(1.0, 8, 8), (0.5, 8, 4), (0.25, 4, 1), (0.26, 4, 2), (0.3, 10, 3), (0.7, 10, 7), (0.01, 8, 1), (0.5, 1, 1)],
)
def test_checkpointed_count_rounds_up_and_keeps_one(ratio: float, total: int, count: int) -> None:
    assert checkpointed_count(ratio, total) == count


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.01])
def test_checkpointed_count_refuses_ratios_outside_0_1(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        checkpointed_count(ratio, 4)


# ------------------------------------------------------------------------------------------ each family
@pytest.mark.parametrize("family", FAMILIES)
def test_every_ratio_gives_the_same_gradients_recomputes_the_first_blocks_and_saves_less(
    cases: dict[str, Case], family: str
) -> None:
    case = cases[family]
    spec = case.spec
    loss_ref, grads_ref, bytes_off, calls_off = case.step(case.fresh())
    total = len(calls_off)
    assert total == LAYERS * len(spec.block_lists)
    assert all(forward > 0 and backward == 0 for forward, backward in calls_off)
    assert all(g.abs().sum() > 0 for g in grads_ref.values())

    saved = {0.0: bytes_off}
    for ratio in RATIOS:
        model = case.fresh()
        count = spec.enable_partial_checkpointing(model, ratio)
        assert count == checkpointed_count(ratio, total)
        loss, grads, saved[ratio], calls = case.step(model)
        recomputed = [index for index, (_, backward) in enumerate(calls) if backward]
        assert recomputed == list(range(count)), f"ratio {ratio}: blocks {recomputed} were recomputed"
        assert [forward for forward, _ in calls] == [forward for forward, _ in calls_off]
        assert torch.equal(loss, loss_ref)
        assert_same_grads(grads, grads_ref)

    assert saved[0.0] > saved[0.25] > saved[0.5] > saved[1.0], saved
    assert saved[1.0] < 0.2 * saved[0.0], "checkpointing every block keeps a small fraction of the activations"

    # ratio 1 is the family's switch (diffusers' own where the model has one): same as dittune's on every block
    switch = case.fresh()
    spec.enable_partial_checkpointing(switch, 1.0)
    uses_diffusers = bool(getattr(switch, "gradient_checkpointing", False))
    assert uses_diffusers == (family != "hunyuan-dit")
    assert all(is_checkpointing(b) != uses_diffusers for b in spec.transformer_blocks(switch))
    own = case.fresh()
    enable_block_checkpointing(spec.transformer_blocks(own))
    _, grads_own, bytes_own, _ = case.step(own)
    assert bytes_own == saved[1.0]
    assert_same_grads(grads_own, grads_ref)


# ------------------------------------------------------------------------------------------ with compile
@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_fraction_composes_with_compile(cases: dict[str, Case]) -> None:
    """As `build_run` does it: checkpoint half the blocks, then compile every block (aot_eager: the graphs
    AOTAutograd builds for inductor, without generating C++)."""
    case = cases["hunyuan-dit"]
    loss_ref, grads_ref, bytes_off, _ = case.step(case.fresh())
    model = case.fresh()
    assert case.spec.enable_partial_checkpointing(model, 0.5) == LAYERS // 2
    blocks = case.spec.transformer_blocks(model)
    assert compile_blocks(case.spec, model, backend="aot_eager") == LAYERS
    assert [is_checkpointing(b) for b in blocks] == [True, True, False, False]
    assert all(is_compiled(b) for b in blocks)
    loss, grads, saved, _ = case.step(model)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    assert saved < 0.75 * bytes_off, "the compiled, checkpointed blocks keep only their inputs"


# ------------------------------------------------------------------------------------------ config and run
BASE = {
    "output_dir": "/tmp/out",
    "model": {"family": "sd3", "path": "/tmp/model"},
    "data": {"path": "/tmp/data", "resolution": 64, "resolution_type": "pixel"},
}


def test_the_ratio_is_validated_with_the_switch() -> None:
    def train(**keys: object) -> dict:
        return {**BASE, "train": {"max_steps": 1, **keys}}

    assert validate_config(train()).train.gradient_checkpointing_ratio == 1.0
    cfg = validate_config(train(gradient_checkpointing=True, gradient_checkpointing_ratio=0.5))
    assert cfg.train.gradient_checkpointing_ratio == 0.5
    assert validate_config(train(gradient_checkpointing_ratio=1)).train.gradient_checkpointing_ratio == 1.0
    with pytest.raises(ConfigError, match=r"only applies with train\.gradient_checkpointing = true") as info:
        validate_config(train(gradient_checkpointing_ratio=0.5))
    assert [p.path for p in info.value.problems] == ["train.gradient_checkpointing_ratio"]
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="gradient_checkpointing_ratio"):
            validate_config(train(gradient_checkpointing=True, gradient_checkpointing_ratio=bad))


def test_a_run_checkpoints_the_fraction_and_says_so(
    tmp_path: Path, dataset: Path, cases: dict[str, Case], capsys: pytest.CaptureFixture[str]
) -> None:
    from dittune.cli.main import main

    cfg = write_config(
        tmp_path / "cfg.toml", cases["hunyuan-dit"].spec.path, dataset, tmp_path / "out",
        max_steps=1, gradient_checkpointing=True, gradient_checkpointing_ratio=0.5,
    )  # fmt: skip
    assert main(["train", str(cfg)]) == 0
    assert "checkpointing the first 2 of 4 blocks (ratio 0.5)" in capsys.readouterr().out
