"""Regional compilation (`train.compile`): same loss and gradients, same keys, composes with LoRA and checkpointing.

Most tests compile with the `aot_eager` backend: dynamo traces each block and AOTAutograd builds its forward and
backward graphs exactly as for inductor, without generating C++ (minutes on a small CPU). One slow test runs
the real inductor backend.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch._dynamo
from safetensors.torch import load_file

from conftest import FAMILIES, write_config
from dittune.models.base import ModelSpec, SampleMeta, TrainBatch
from dittune.models.checkpointing import is_checkpointing
from dittune.models.compile import compile_blocks, compile_problems, is_compiled, uncompile_modules
from dittune.models.lora import inject_lora, lora_state_dict
from dittune.models.registry import spec_class

pytestmark = pytest.mark.usefixtures("one_thread")
BACKEND = "aot_eager"
PROMPTS = ["a red circle on a white background", "a blue circle"]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    """Graphs dynamo has compiled so far in this process."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def real_batch(spec: ModelSpec, size: int = 64) -> TrainBatch:
    """Two samples through the family's own text encoders and VAE (so any family works)."""
    device = torch.device("cpu")
    text = spec.encode_prompts(spec.load_text_encoders(device, torch.float32), PROMPTS)
    pixels = torch.rand(len(PROMPTS), 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        moments = spec.encode_pixels(spec.load_vae(device, torch.float32), pixels)
    return TrainBatch(
        moments={k: torch.stack([m[k] for m in moments]) for k in moments[0]},
        text={k: torch.stack([t[k] for t in text]) for k in text[0]},
        meta=[SampleMeta((size, size), (size, size), (0, 0))] * len(PROMPTS),
    )


def make_denoiser(spec: ModelSpec, method: str) -> torch.nn.Module:
    model = spec.load_denoiser(torch.float32)
    if method == "lora":
        model.requires_grad_(False)
        inject_lora(model, rank=4, alpha=4.0, targets=list(spec.default_lora_targets))
        generator = torch.Generator().manual_seed(3)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapter an effect, so A gets gradients
                with torch.no_grad():
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
                param.requires_grad_(True)
            elif "lora_A" in name:
                param.requires_grad_(True)
    return model.train()


def loss_and_grads(spec: ModelSpec, model: torch.nn.Module, batch: TrainBatch, method: str):
    model.zero_grad(set_to_none=True)
    scheduler = spec.load_scheduler()
    settings = spec.default_loss_settings(method)
    out = spec.compute_loss(model, scheduler, batch, torch.Generator().manual_seed(7), settings)
    if torch.is_grad_enabled():
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def assert_compiled_equals_eager(spec: ModelSpec, method: str, checkpointing: str, backend: str = BACKEND) -> None:
    """Compile a copy of the model (checkpointing before/after/none) and compare one training step."""
    batch = real_batch(spec)
    eager = make_denoiser(spec, method)
    model = copy.deepcopy(eager)
    keys, lora_keys = list(model.state_dict()), list(lora_state_dict(model)) if method == "lora" else []
    if checkpointing == "before":
        spec.enable_gradient_checkpointing(model)
    assert compile_blocks(spec, model, backend=backend) == len(spec.transformer_blocks(model))
    if checkpointing == "after":
        spec.enable_gradient_checkpointing(model)
    assert all(is_compiled(block) for block in spec.transformer_blocks(model))

    before = graphs()
    loss_ref, grads_ref = loss_and_grads(spec, eager, batch, method)
    loss, grads = loss_and_grads(spec, model, batch, method)
    assert graphs() > before, "the blocks must run compiled"
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)

    assert list(model.state_dict()) == keys
    assert not any("_orig_mod" in key for key in model.state_dict())
    if method == "lora":
        assert list(lora_state_dict(model)) == lora_keys

    # evaluation (validation, sampling) runs the eager forward: no new graphs, same output
    before = graphs()
    model.eval()
    eager.eval()
    with torch.no_grad():
        loss_eval, _ = loss_and_grads(spec, model, batch, method)
        loss_eval_ref, _ = loss_and_grads(spec, eager, batch, method)
    assert graphs() == before
    torch.testing.assert_close(loss_eval, loss_eval_ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ declarations
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_declares_its_blocks(family_models: dict[str, Path], family: str) -> None:
    spec = spec_class(family)(family_models[family])
    model = spec.load_denoiser(torch.float32)
    blocks = spec.transformer_blocks(model)
    cfg = spec.transformer_config
    assert len(blocks) == cfg["num_layers"] + cfg.get("num_single_layers", 0)
    assert len({type(block) for block in blocks}) == (2 if family == "flux" else 1)
    assert not any(isinstance(block, torch.nn.ModuleList) for block in blocks)


def test_missing_block_list_is_named(tiny_models: dict[str, Path]) -> None:
    spec = spec_class("hunyuan-dit")(tiny_models["v1.2"])
    with pytest.raises(ValueError, match="no block list"):
        spec.transformer_blocks(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize(
    ("method", "checkpointing"),
    [("lora", "before"), ("full", "after"), ("full", "none")],
)
def test_hunyuan_compiled_equals_eager(tiny_models: dict[str, Path], method: str, checkpointing: str) -> None:
    spec = spec_class("hunyuan-dit")(tiny_models["v1.2"])
    assert_compiled_equals_eager(spec, method, checkpointing)


def test_flux_compiled_equals_eager_with_diffusers_checkpointing(family_models: dict[str, Path]) -> None:
    """Two block lists (double and single stream) and diffusers' own checkpointing switch."""
    spec = spec_class("flux")(family_models["flux"])
    assert_compiled_equals_eager(spec, "lora", "before")


def test_compile_is_idempotent_and_undone(tiny_models: dict[str, Path]) -> None:
    spec = spec_class("hunyuan-dit")(tiny_models["v1.2"])
    model = make_denoiser(spec, "full")
    spec.enable_gradient_checkpointing(model)
    blocks = spec.transformer_blocks(model)
    assert compile_blocks(spec, model, backend=BACKEND) == len(blocks)
    assert compile_blocks(spec, model, backend=BACKEND) == 0
    uncompile_modules(blocks)
    assert not any(is_compiled(b) for b in blocks)
    assert all(is_checkpointing(b) for b in blocks), "checkpointing survives"


def test_compile_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    assert compile_problems("cuda") == []
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "C++ compiler" in compile_problems("cpu")[0]
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    assert compile_problems("cpu") == []


# ------------------------------------------------------------------------------------------ a real run
@pytest.mark.slow
def test_train_with_compile_saves_and_resumes(tmp_path, tiny_models, dataset, monkeypatch) -> None:
    """`train.compile = true` end to end: checkpoint, resume, validation, LoRA export keys as without it."""
    from dittune.cli.main import main

    calls: list[object] = []
    real_compile = torch.compile

    def fast_compile(fn, **options):
        calls.append(fn)
        return real_compile(fn, **{**options, "backend": BACKEND})

    monkeypatch.setattr(torch, "compile", fast_compile)
    extra = '[checkpoint]\nevery_steps = 2\n[validation]\nevery_steps = 2\nprompts = ["a red circle"]\nsteps = 2\n'
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"run-{compiled}"
        cfg = write_config(
            tmp_path / f"cfg-{compiled}.toml", tiny_models["v1.2"], dataset, out, extra,
            method="lora", compile=compiled, gradient_checkpointing=True, max_steps=2,
        )  # fmt: skip
        assert main(["train", str(cfg)]) == 0
        cfg.write_text(cfg.read_text().replace("max_steps = 2", "max_steps = 3"))
        assert main(["train", str(cfg), "--resume", "latest"]) == 0
        runs[compiled] = load_file(out / "final" / "lora.safetensors")
    assert len(calls) == 8, "build_run compiles the 4 blocks, in the first and in the resumed run"
    assert list(runs[True]) == list(runs[False])
    for key in runs[False]:
        torch.testing.assert_close(runs[True][key], runs[False][key], rtol=1e-3, atol=1e-5, msg=key)


# ------------------------------------------------------------------------------------------ inductor
@pytest.mark.slow
def test_inductor_compiled_equals_eager(family_models: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    """The real backend (C++ kernels on CPU): one block kind, full fine-tuning; ~0.5–5 min with an empty cache.

    The kernel cache is the test's own: inductor's shared one (/tmp/torchinductor_USER) is keyed without the
    ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA limits, and kernels built under other limits gave NaN here.
    """
    if compile_problems("cpu"):
        pytest.skip(compile_problems("cpu")[0])
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    spec = spec_class("pixart-sigma")(family_models["pixart-sigma"])
    assert_compiled_equals_eager(spec, "full", "none", backend="inductor")


def test_compile_options_reach_torch_compile(tiny_models: dict[str, Path], monkeypatch) -> None:
    seen: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: seen.append(options) or fn)
    spec = spec_class("hunyuan-dit")(tiny_models["v1.2"])
    compile_blocks(spec, spec.load_denoiser(torch.float32), mode="max-autotune", dynamic=False)
    assert seen == [{"mode": "max-autotune", "dynamic": False}] * 4
