"""Every `train.optimizer` (and `optimizer_offload`): it trains, resumes bit-exactly, and offloading changes nothing."""

from __future__ import annotations

import io
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_config
from dittune.cli.main import main
from dittune.config.load import load_config
from dittune.config.schema import TrainSection
from dittune.train.offload_optim import OffloadOptimizer
from dittune.train.optim import (
    averaged_weights,
    build_lr_scheduler,
    build_optimizer,
    optimizer_arg_problems,
    optimizer_problems,
    optimizer_warnings,
    set_optimizer_mode,
    state_bytes,
)
from dittune.train.preflight import device_checks, preflight
from dittune.train.state_io import load_tree

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit", "adafactor", "prodigy", "schedulefree_adamw")
LEARNING_RATES = {"lion8bit": 1e-3, "adafactor": 1e-2, "prodigy": 1.0, "schedulefree_adamw": 1e-2}
CASES = [(name, False) for name in OPTIMIZERS] + [("adamw", True), ("schedulefree_adamw", True)]


def _model(seed: int = 0) -> torch.nn.Module:
    """64×64 weights: 4096 elements, so the 8-bit optimizers keep 8-bit states for them."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )


_X = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
_Y = 0.5 * _X[:, :4].sum(dim=1, keepdim=True)


def _train_section(name: str, offload: bool = False, **extra: object) -> TrainSection:
    settings = {"learning_rate": LEARNING_RATES.get(name, 1e-2), "lr_scheduler": "cosine", "lr_warmup_steps": 3}
    return TrainSection(max_steps=40, optimizer=name, optimizer_offload=offload, **{**settings, **extra})


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    rows = slice(32 * (step % 8), 32 * (step % 8 + 1))
    return torch.nn.functional.mse_loss(model(_X[rows]), _Y[rows])


def _steps(model, optimizer, scheduler, start: int, stop: int) -> list[float]:
    losses = []
    for step in range(start, stop):
        loss = _loss(model, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _build(name: str, offload: bool, seed: int = 0):
    model = _model(seed)
    train = _train_section(name, offload)
    optimizer = build_optimizer(model.parameters(), train)
    scheduler = build_lr_scheduler(optimizer, train)
    set_optimizer_mode(optimizer, training=True)
    return model, optimizer, scheduler


def _round_trip(value: object) -> object:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(("name", "offload"), CASES)
def test_trains_and_resumes_bit_exactly(name, offload):
    """The loss falls; 20 steps, a checkpoint (averaged weights for schedule-free), a fresh model and optimizer
    loading it, 20 more: the same weights as 40 steps straight, which also passed through the checkpoint."""
    model, optimizer, scheduler = _build(name, offload)
    first = _steps(model, optimizer, scheduler, 0, 20)
    with averaged_weights(optimizer):
        saved = _round_trip(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        )
    last = _steps(model, optimizer, scheduler, 20, 40)
    assert sum(last[-8:]) < 0.5 * sum(first[:8]), (first, last)

    resumed, optimizer2, scheduler2 = _build(name, offload, seed=1)
    resumed.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    scheduler2.load_state_dict(saved["scheduler"])
    set_optimizer_mode(optimizer2, training=True)
    assert _steps(resumed, optimizer2, scheduler2, 20, 40) == last
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_offload_is_bit_identical_to_the_plain_optimizer(name):
    plain, plain_opt, plain_sched = _build(name, offload=False)
    offloaded, offload_opt, offload_sched = _build(name, offload=True)
    assert isinstance(offload_opt, OffloadOptimizer)
    assert _steps(plain, plain_opt, plain_sched, 0, 12) == _steps(offloaded, offload_opt, offload_sched, 0, 12)
    with averaged_weights(plain_opt), averaged_weights(offload_opt):
        for a, b in zip(plain.parameters(), offloaded.parameters()):
            assert torch.equal(a, b)
    assert offload_sched.get_last_lr() == plain_sched.get_last_lr()
    assert [g["lr"] for g in offload_opt.optimizer.param_groups] == [g["lr"] for g in plain_opt.param_groups]
    # the state is the wrapped optimizer's, interchangeable with the plain one's
    state = _round_trip(offload_opt.state_dict())
    assert state["state"].keys() == plain_opt.state_dict()["state"].keys()
    plain_opt.load_state_dict(state)


def test_offload_works_with_gradient_scaling():
    """GradScaler unscales through `param_groups`, which must hold the training parameters (fp16 runs)."""
    results = []
    for offload in (False, True):
        model, optimizer, _ = _build("adamw", offload)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        for step in range(4):
            scaler.scale(_loss(model, step)).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_schedule_free_switches_to_the_average_and_back():
    model, optimizer, scheduler = _build("schedulefree_adamw", offload=False)
    _steps(model, optimizer, scheduler, 0, 5)
    training = [p.detach().clone() for p in model.parameters()]
    with averaged_weights(optimizer):
        averaged = [p.detach().clone() for p in model.parameters()]
        assert optimizer.param_groups[0]["train_mode"] is False
    assert optimizer.param_groups[0]["train_mode"] is True
    assert not any(torch.equal(a, b) for a, b in zip(training, averaged))
    assert all(torch.allclose(a, p, rtol=0, atol=1e-6) for a, p in zip(training, model.parameters()))
    plain, plain_opt, plain_sched = _build("adamw", offload=False)
    _steps(plain, plain_opt, plain_sched, 0, 5)
    before = [p.detach().clone() for p in plain.parameters()]
    with averaged_weights(plain_opt):  # a no-op for the others
        assert all(torch.equal(a, b) for a, b in zip(before, plain.parameters()))


EXPECTED_BYTES = {  # per parameter of one 256×256 weight: see docs (optimizers.md)
    "adamw": 8,
    "adamw8bit": 2,
    "lion8bit": 1,
    "adafactor": 0,
    "prodigy": 16,
    "schedulefree_adamw": 8,
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_bytes_per_parameter(name):
    weight = torch.nn.Parameter(torch.randn(256, 256) * 0.02)
    optimizer = build_optimizer([weight], _train_section(name))
    set_optimizer_mode(optimizer, training=True)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    per_param = state_bytes(optimizer)["cpu"] / weight.numel()
    assert EXPECTED_BYTES[name] <= per_param < EXPECTED_BYTES[name] + 0.1, per_param
    offloaded = build_optimizer([weight], _train_section(name, offload=True))
    set_optimizer_mode(offloaded, training=True)
    offloaded.step()
    assert state_bytes(offloaded)["cpu"] / weight.numel() == pytest.approx(per_param + 8)  # + weights, gradients


def test_config_checks_name_the_key():
    assert optimizer_problems(_train_section("prodigy")) == []
    lion = _train_section("lion8bit", adam_beta2=0.99, optimizer_args={"lr": 1.0, "betas": [0.9, 0.99]})
    assert [key for key, _ in optimizer_problems(lion)] == ["train.adam_beta2", "train.optimizer_args.lr"]
    adam = _train_section("adamw", optimizer_args={"eps": 1e-6, "amsgrad": True})
    assert [key for key, _ in optimizer_problems(adam)] == ["train.optimizer_args.eps"]
    assert optimizer_arg_problems(adam) == []
    problems = optimizer_arg_problems(_train_section("prodigy", optimizer_args={"d_coef": 0.5, "d_cof": 0.5}))
    assert [key for key, _ in problems] == ["train.optimizer_args.d_cof"] and "d_coef" in problems[0][1]
    assert "normally 1.0" in optimizer_warnings(_train_section("prodigy", learning_rate=1e-4))[0]
    assert optimizer_warnings(_train_section("schedulefree_adamw", lr_scheduler="constant")) == []
    assert "safeguard_warmup" in optimizer_warnings(_train_section("prodigy"))[0]  # warmup 3
    assert optimizer_warnings(_train_section("prodigy", optimizer_args={"safeguard_warmup": True})) == []
    assert optimizer_warnings(_train_section("adamw", offload=True), "cuda") == []


def test_missing_package_names_the_key_and_the_command(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "schedulefree" else find_spec(name))
    (key, message), *_ = optimizer_problems(_train_section("schedulefree_adamw"))
    assert key == "train.optimizer" and 'pip install "dittune[schedulefree]"' in message
    monkeypatch.setattr("dittune.train.optim._torch_version", lambda: (2, 4))
    assert [key for key, _ in optimizer_problems(_train_section("adafactor"))] == ["train.optimizer"]


def test_preflight_and_device_checks_report_optimizer_settings(tmp_path, tiny_models, dataset):
    path = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], dataset, tmp_path / "run", adam_beta2=0.99)
    cfg = load_config(path, ["train.optimizer=prodigy", "train.optimizer_args.d_coef=0.5"])
    assert cfg.train.optimizer_args == {"d_coef": 0.5}
    assert preflight(cfg) == [] and device_checks(cfg, "cpu") == []
    cfg = load_config(path, ["train.optimizer=lion8bit", "train.optimizer_args.beta=[0.9, 0.99]"])
    assert [key for key, _ in preflight(cfg)] == ["train.adam_beta2"]
    assert [key for key, _ in device_checks(cfg, "cpu")] == ["train.optimizer_args.beta"]


# ----------------------------------------------------------------------- through `dittune train`
@pytest.mark.parametrize(
    ("method", "optimizer", "offload"), [("lora", "schedulefree_adamw", False), ("full", "adamw", True)]
)
def test_train_and_resume_latest(tmp_path, tiny_models, dataset, capsys, method, optimizer, offload):
    """4 steps straight vs a crash after the step-2 checkpoint and `--resume latest`: identical exports.
    Schedule-free also validates every 2 steps (averaged weights in and out)."""
    extra = "[checkpoint]\nevery_steps = 2\nkeep_last = 5\n"
    if optimizer == "schedulefree_adamw":
        extra += '[validation]\nevery_steps = 2\nprompts = ["a red circle"]\nsteps = 2\n'
    straight = tmp_path / "straight"
    settings = dict(method=method, optimizer=optimizer, optimizer_offload=offload, learning_rate=1e-3)
    cfg = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], dataset, straight, extra, **settings)
    assert main(["train", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert f"{optimizer}, state on the CPU (optimizer_offload)" in printed if offload else f"{optimizer}, " in printed
    assert ("warning: optimizer_offload on a CPU-only run" in printed) == offload

    crashed = tmp_path / "crashed"
    shutil.copytree(straight / "checkpoints" / "step_00000002", crashed / "checkpoints" / "step_00000002")
    args = ["train", str(cfg), "--set", f"output_dir={crashed}", "--set", f"cache.dir={straight / 'cache'}"]
    assert main([*args, "--resume", "latest"]) == 0
    name = "lora.safetensors" if method == "lora" else "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(straight / "final" / name), load_file(crashed / "final" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if method == "full":  # it trained
        base = load_file(tiny_models["v1.2"] / "transformer" / "diffusion_pytorch_model.safetensors")
        assert sum(not torch.equal(base[k], a[k]) for k in a) > len(a) // 2
    else:
        assert all(a[k].abs().max() > 0 for k in a if "lora_B" in k)
    if optimizer == "schedulefree_adamw":  # checkpoints and the export hold the averaged weights
        checkpoint = straight / "checkpoints" / "step_00000004"
        groups = load_tree(checkpoint, "training_state")["optimizer"]["param_groups"]
        assert all(group["train_mode"] is False for group in groups)
        saved = load_file(checkpoint / "adapter.safetensors")
        assert all(torch.allclose(saved[k], a[f"transformer.{k}"], rtol=0, atol=1e-8) for k in saved)
