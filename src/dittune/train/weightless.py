"""Run a family's own loading and compute code with fake weights: shapes, dtypes and devices, no data.

Inside `weightless()`, diffusers' `ModelMixin.from_pretrained` and transformers' `PreTrainedModel.from_pretrained`
build the model from its config file alone (no weight file is opened), in the requested dtype with the classes'
keep-in-fp32 modules kept in fp32 as loading does, under a `FakeTensorMode`: every parameter is a `FakeTensor`
(metadata only, nothing allocated). So `ModelSpec.load_text_encoders`, `load_vae`, `load_denoiser` and
`build_pipeline` run unchanged and return models of fake parameters; a model of billions of parameters is built
in seconds. Whatever such a model computes is fake too, while the code around it (tokenizers, masks, noise,
schedulers) keeps computing real values where it needs them, e.g. an attention mask's lengths or a scheduler's
step index. Enter the yielded mode to make other tensors fake (inputs, LoRA layers, optimizer state).

A check of a computed value that decides the control flow cannot be answered: `torch.equal` on fake tensors
answers False (the general branch, e.g. keep every channel); the answers given are listed in `Assumed.seen`.
Anything else that needs a computed value (`.item()`, a data-dependent shape) raises, which callers report.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from dittune.models.single_file import cast_floating, diffusers_keep


def fake_mode() -> FakeTensorMode:
    """A `FakeTensorMode` that accepts real inputs and keeps no memo of the fakes it makes (a memo entry holds a
    weak reference that stops `nn.Module.to` from swapping a fake parameter)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.fake_tensor_converter.set_tensor_memo = lambda tensor, fake: None  # type: ignore[method-assign]
    return mode


def _transformers_keep(model: Any, dtype: torch.dtype) -> Callable[[str], bool]:
    """transformers' rule: `_keep_in_fp32_modules` for fp16, `_keep_in_fp32_modules_strict` for fp16 and bf16,
    each a pattern (`*` any text) searched in the name."""
    patterns = list(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else []
    if dtype in (torch.float16, torch.bfloat16):
        patterns += list(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if not patterns:
        return lambda name: False
    found = re.compile("|".join(pattern.replace("*", ".*") for pattern in patterns))
    return lambda name: found.search(name) is not None


def _folder(path: str | Path, kwargs: dict[str, Any]) -> Path:
    subfolder = kwargs.pop("subfolder", None)
    return Path(path) / subfolder if subfolder else Path(path)


def _diffusers_from_config(mode: FakeTensorMode, cls: type, path: str | Path, *args: Any, **kwargs: Any) -> Any:
    folder = _folder(path, kwargs)
    dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
    with mode:
        model = cls.from_config(cls.load_config(folder))
        if isinstance(dtype, torch.dtype):
            cast_floating(model, dtype, diffusers_keep(getattr(cls, "_keep_in_fp32_modules", None)))
    return model.eval()


def _transformers_from_config(mode: FakeTensorMode, cls: type, path: str | Path, *args: Any, **kwargs: Any) -> Any:
    folder = _folder(path, kwargs)
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    config = kwargs.pop("config", None) or cls.config_class.from_pretrained(folder)
    accepted = inspect.signature(cls.__init__).parameters
    init = {key: value for key, value in kwargs.items() if key in accepted}
    for key, value in kwargs.items():
        if key not in accepted and hasattr(config, key):
            setattr(config, key, value)
    if isinstance(dtype, torch.dtype):
        init["dtype"] = dtype
    with mode:
        model = cls._from_config(config, **init)
        if isinstance(dtype, torch.dtype):  # built in `dtype`; only the kept-in-fp32 patterns change
            cast_floating(model, None, _transformers_keep(model, dtype))
    return model.eval()


class Assumed(TorchDispatchMode):
    """Answers `torch.equal` on fake tensors with False and notes it in `seen` (op names)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten.equal.default and any(isinstance(a, FakeTensor) for a in args):
            self.seen.add("torch.equal → False")
            return False
        return func(*args, **(kwargs or {}))


@contextmanager
def weightless() -> Iterator[tuple[FakeTensorMode, Assumed]]:
    """Config-only loading into fake parameters within (see the module docstring); yields the fake mode (enter
    it to make tensors fake) and the `Assumed` answers given."""
    import diffusers
    import transformers

    mode, assumed = fake_mode(), Assumed()
    originals = [
        (diffusers.ModelMixin, diffusers.ModelMixin.__dict__["from_pretrained"], _diffusers_from_config),
        (
            transformers.PreTrainedModel,
            transformers.PreTrainedModel.__dict__["from_pretrained"],
            _transformers_from_config,
        ),
    ]
    for owner, _, replacement in originals:
        owner.from_pretrained = classmethod(partial(replacement, mode))  # type: ignore[method-assign,assignment]
    try:
        with assumed:
            yield mode, assumed
    finally:
        for owner, original, _ in originals:
            owner.from_pretrained = original  # type: ignore[method-assign]
