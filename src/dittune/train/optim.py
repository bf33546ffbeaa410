"""Optimizer and learning-rate schedule from the config.

Importing this module does not import torch: `preflight` uses the tables and checks below.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from dittune.config.schema import TrainSection

if TYPE_CHECKING:
    import torch

PACKAGES: dict[str, tuple[str, str]] = {
    "adamw8bit": ("bitsandbytes", 'pip install "dittune[bnb]"'),
    "lion8bit": ("bitsandbytes", 'pip install "dittune[bnb]"'),
    "prodigy": ("prodigyopt", 'pip install "dittune[prodigy]"'),
    "schedulefree_adamw": ("schedulefree", 'pip install "dittune[schedulefree]"'),
}
"""optimizer → (module it needs, the command that installs it); torch's own need nothing."""

ADAM_STYLE = ("adamw", "adamw8bit", "prodigy", "schedulefree_adamw")
"""Optimizers that read `adam_beta1`, `adam_beta2` and `adam_epsilon`."""

_OWN_KEYS = {"lr": "learning_rate", "weight_decay": "weight_decay", "params": None}
_ADAM_KEYS = {"betas": "adam_beta1 / adam_beta2", "eps": "adam_epsilon"}


def optimizer_class(name: str) -> type:
    """The optimizer class behind a `train.optimizer` name (imports its package)."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW
    if name == "adafactor":
        return torch.optim.Adafactor
    if name in ("adamw8bit", "lion8bit"):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.Lion8bit
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy
    if name == "schedulefree_adamw":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree
    raise ValueError(f"unknown optimizer {name!r}")


def optimizer_kwargs(train: TrainSection) -> dict[str, Any]:
    """Constructor arguments from the config: the dedicated keys, then `optimizer_args` (lists become tuples)."""
    kwargs: dict[str, Any] = {"lr": train.learning_rate, "weight_decay": train.weight_decay}
    if train.optimizer in ADAM_STYLE:
        kwargs.update(betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon)
    for key, value in train.optimizer_args.items():
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return kwargs


def build_optimizer(params: Iterable[torch.nn.Parameter], train: TrainSection) -> torch.optim.Optimizer:
    """The configured optimizer over `params` (a flat list); wrapped to step on the CPU with `optimizer_offload`."""
    params = list(params)
    if train.optimizer_offload:
        from dittune.train.offload_optim import OffloadOptimizer

        return OffloadOptimizer(params, lambda masters: _make(masters, train))
    return _make(params, train)


def _make(params: list[torch.Tensor], train: TrainSection) -> torch.optim.Optimizer:
    import torch

    kwargs = optimizer_kwargs(train)
    if train.optimizer == "adamw" and "fused" not in kwargs and "foreach" not in kwargs:
        # The fused kernel is several times faster than the per-parameter loop (CPU and CUDA).
        fused_dtypes = (torch.float32, torch.float16, torch.bfloat16)
        kwargs["fused"] = all(p.device.type in ("cpu", "cuda") and p.dtype in fused_dtypes for p in params)
    return optimizer_class(train.optimizer)(params, **kwargs)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection) -> torch.optim.lr_scheduler.LRScheduler:
    """A schedule stepped once per optimizer step (steps count optimizer steps)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train.lr_warmup_steps,
        num_training_steps=train.max_steps,
    )


# ----------------------------------------------------------------- schedule-free: train and eval weights
def set_optimizer_mode(optimizer: Any, training: bool) -> None:
    """Put the training weights (`training`) or the averaged weights into the parameters of a schedule-free
    optimizer (its `train()` / `eval()`); a no-op for the others. accelerate's wrapper forwards both calls."""
    method = getattr(optimizer, "train" if training else "eval", None)
    if callable(method):
        method()


@contextmanager
def averaged_weights(optimizer: Any) -> Iterator[None]:
    """Within: a schedule-free optimizer's parameters hold its averaged weights (what to validate, save and
    export); it is back in train mode afterwards if it was. A no-op for other optimizers.

    Call it on every process: the switch rounds, so processes that all do it keep equal weights.
    """
    training = bool(optimizer.param_groups and optimizer.param_groups[0].get("train_mode"))
    if training:
        set_optimizer_mode(optimizer, False)
    try:
        yield
    finally:
        if training:
            set_optimizer_mode(optimizer, True)


# ----------------------------------------------------------------- checks and notes (no torch)
def optimizer_problems(train: TrainSection) -> list[tuple[str, str]]:
    """(key, message) for a missing package, keys the optimizer does not read and arguments that have a key."""
    name = train.optimizer
    problems: list[tuple[str, str]] = []
    if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None:
        module, command = PACKAGES[name]
        problems.append(("train.optimizer", f"{name} needs {module}: {command} (or choose another optimizer)."))
    if name == "adafactor" and _torch_version() < (2, 5):
        problems.append(("train.optimizer", "adafactor is torch.optim.Adafactor (torch ≥ 2.5): pip install -U torch."))
    if name not in ADAM_STYLE:
        for key in sorted({"adam_beta1", "adam_beta2", "adam_epsilon"} & train.model_fields_set):
            hint = " (its betas: train.optimizer_args = {betas = [0.9, 0.99]})" if name == "lion8bit" else ""
            problems.append((f"train.{key}", f"{name} does not use it; remove it{hint}."))
    own = {**_OWN_KEYS, **(_ADAM_KEYS if name in ADAM_STYLE else {})}
    for arg in sorted(set(train.optimizer_args) & set(own)):
        use = f"set train.{own[arg]} instead" if own[arg] else "it is not an option"
        problems.append((f"train.optimizer_args.{arg}", f"{use}."))
    return problems


def _torch_version() -> tuple[int, ...]:
    """(major, minor) of the installed torch, read without importing it."""
    from importlib.metadata import version

    return tuple(int(part) for part in version("torch").split("+")[0].split(".")[:2])


def optimizer_arg_problems(train: TrainSection) -> list[tuple[str, str]]:
    """Arguments in `optimizer_args` that the optimizer's constructor does not take (imports its package)."""
    import inspect

    name = train.optimizer
    missing = name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None
    if missing or (name == "adafactor" and _torch_version() < (2, 5)):
        return []  # reported by optimizer_problems
    cls = optimizer_class(name)
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "params")]
    return [
        (f"train.optimizer_args.{arg}", f"{cls.__name__} takes no argument {arg!r} (it takes {', '.join(accepted)}).")
        for arg in train.optimizer_args
        if arg not in accepted and arg not in _OWN_KEYS
    ]


def optimizer_label(train: TrainSection) -> str:
    """The optimizer as the start-up summary names it, e.g. "adamw, state on the CPU"."""
    args = ", ".join(f"{key}={value}" for key, value in train.optimizer_args.items())
    label = train.optimizer + (f" ({args})" if args else "")
    return label + (", state on the CPU (optimizer_offload)" if train.optimizer_offload else "")


def optimizer_warnings(train: TrainSection, device_type: str | None = None) -> list[str]:
    """Settings that run but are probably not meant (printed with the start-up summary)."""
    warnings = []
    lr, name = train.learning_rate, train.optimizer
    if name == "prodigy" and not 0.1 <= lr <= 10:
        warnings.append(
            f"prodigy estimates the step size itself and learning_rate ({lr:g}) multiplies that estimate; "
            "it is normally 1.0 (set train.learning_rate = 1.0; d_coef in optimizer_args scales the estimate)."
        )
    if name == "prodigy" and train.lr_warmup_steps and not train.optimizer_args.get("safeguard_warmup"):
        warnings.append(
            "prodigy may overestimate its step size during lr warmup; set "
            "train.optimizer_args = {safeguard_warmup = true} (or lr_warmup_steps = 0)."
        )
    if name == "adafactor" and lr < 1e-3:
        warnings.append(
            f"adafactor's learning_rate ({lr:g}) caps its relative step: a step moves each weight tensor by at most "
            "learning_rate × its RMS (at least 1e-3 × learning_rate, as for LoRA's zero-initialised B); "
            "1e-3–1e-2 is the usual range."
        )
    if name == "schedulefree_adamw" and train.lr_scheduler not in ("constant", "constant_with_warmup"):
        warnings.append(
            f"schedulefree_adamw averages the weights itself; the {train.lr_scheduler!r} schedule decays on top of "
            'that. lr_scheduler = "constant" (with lr_warmup_steps) is the intended use.'
        )
    if train.optimizer_offload and device_type == "cpu":
        warnings.append("optimizer_offload on a CPU-only run saves nothing; it adds two weight copies per step.")
    return warnings


def optimizer_tensors(optimizer: Any) -> list[Any]:
    """The tensors of an optimizer's state (and of an `OffloadOptimizer`'s CPU copies and buffers)."""
    import torch

    found: list[Any] = []

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            for child in value.values():
                add(child)
        elif isinstance(value, list | tuple):
            for child in value:
                add(child)

    add(list(optimizer.state.values()))
    for candidate in (optimizer, getattr(optimizer, "optimizer", None)):  # itself, or inside accelerate's wrapper
        if hasattr(candidate, "offload_buffers"):
            add(candidate.offload_buffers())
            break
    return found


def state_bytes(optimizer: Any) -> dict[str, int]:
    """Bytes of optimizer state by device type ("cpu", "cuda", …), tensors in its `state` only; an
    `OffloadOptimizer` adds its fp32 weight copies and gradient buffers."""
    totals: dict[str, int] = {}
    for tensor in optimizer_tensors(optimizer):
        totals[tensor.device.type] = totals.get(tensor.device.type, 0) + tensor.numel() * tensor.element_size()
    return totals
