"""Frozen base weights of a LoRA run stored in fp8 or quantised (`model.base_storage`), for any family.

Only plain `nn.Linear` layers of the denoiser that are frozen, not LoRA's own layers, and not matched by a skip
pattern (norms, embeddings, the final projection: `ModelSpec.storage_skip_patterns` plus the diffusers model
class's own `_skip_layerwise_casting_patterns` and `_keep_in_fp32_modules`) change storage. Everything else,
and the LoRA weights (fp32), stay as they were; the module tree and the LoRA keys do not change.

- fp8 (`fp8_e4m3`, `fp8_e5m2`): the weight is rounded to fp8 once and upcast to the compute dtype (the dtype
  the rest of the denoiser is stored in) per layer in the forward pass and again in the backward pass, so no
  upcast copy outlives its layer (diffusers' own layerwise-casting hook keeps every upcast weight alive for
  the backward pass unless blocks are recomputed). The hook is registered under diffusers' layerwise-casting
  name, so `denoiser.dtype` reports the compute dtype and the stock pipelines run the denoiser unchanged.
- `nf4`, `int8`: bitsandbytes' `Linear4bit` (NF4, double-quantised statistics) and `Linear8bitLt`
  (LLM.int8(), outlier threshold 6) replace those layers, quantised on `device`; works on CUDA and on CPUs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

BASE_STORAGES = ("default", "fp8_e4m3", "fp8_e5m2", "nf4", "int8")
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
LORA_LAYER_PATTERNS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
"""peft's adapter layer names: never converted, whatever the skip patterns say."""
INT8_THRESHOLD = 6.0
"""LLM.int8() outlier threshold (bitsandbytes' and diffusers' default for 8-bit loading)."""
_HOOK_NAME = "layerwise_casting"  # diffusers' name: `ModelMixin.dtype` then reports the hook's compute dtype
_REPORT = "_dittune_base_storage"


@dataclass(frozen=True)
class BaseStorage:
    """What `apply_base_storage` did: the storage, the layers converted and kept, and their bytes."""

    storage: str
    converted: int
    kept: int
    bytes_before: int
    """Bytes of the converted layers' weights before conversion."""
    bytes_after: int
    """Bytes of the converted layers' weights (with quantisation statistics) after conversion."""

    def line(self) -> str:
        """One line for the start-up summary."""
        if self.storage == "default":
            return "default (as model.weight_dtype)"
        return (
            f"{self.storage}: {self.converted} Linear layers, {_mb(self.bytes_before)} → {_mb(self.bytes_after)} "
            f"({self.kept} kept by skip patterns)"
        )


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


class _UpcastLinear(torch.autograd.Function):
    """`F.linear` with a low-precision frozen weight upcast on the fly; only the stored weight is kept for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        return F.linear(x, weight.to(dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_input = grad.matmul(weight.to(grad.dtype)) if ctx.needs_input_grad[0] else None
        return None if grad_input is None else grad_input.to(ctx.input_dtype), None, None, None


def _fp8_hook(storage_dtype: torch.dtype, compute_dtype: torch.dtype) -> Any:
    from diffusers.hooks.layerwise_casting import LayerwiseCastingHook

    class Fp8Hook(LayerwiseCastingHook):
        """Stores the weight (not the bias) in fp8; `new_forward` upcasts it inside `_UpcastLinear`."""

        def initialize_hook(self, module: nn.Module) -> nn.Module:
            module.weight.data = module.weight.data.to(self.storage_dtype)
            return module

        def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
            return args, kwargs

        def post_forward(self, module: nn.Module, output: Any) -> Any:
            return output

        def new_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return _UpcastLinear.apply(x, module.weight, module.bias, self.compute_dtype)

    return Fp8Hook(storage_dtype, compute_dtype, non_blocking=False)


def skip_patterns(denoiser: nn.Module, spec_patterns: Sequence[str]) -> tuple[str, ...]:
    """The spec's patterns, the model class's own precision-critical modules, and LoRA's layers."""
    model_patterns = [
        *(getattr(denoiser, "_skip_layerwise_casting_patterns", None) or ()),
        *(getattr(denoiser, "_keep_in_fp32_modules", None) or ()),
    ]
    return tuple(dict.fromkeys([*spec_patterns, *model_patterns, *LORA_LAYER_PATTERNS]))


def frozen_linears(denoiser: nn.Module, patterns: Sequence[str]) -> tuple[list[tuple[str, nn.Linear]], int]:
    """(name, layer) of every frozen plain `nn.Linear` not matched by `patterns` (`re.search` on the module name,
    as diffusers does), and how many frozen plain Linear layers the patterns kept."""
    chosen, kept = [], 0
    for name, module in denoiser.named_modules():
        if type(module) is not nn.Linear or any(p.requires_grad for p in module.parameters()):
            continue
        if any(re.search(pattern, name) for pattern in patterns):
            kept += not any(re.search(pattern, name) for pattern in LORA_LAYER_PATTERNS)
            continue
        chosen.append((name, module))
    return chosen, kept


def tensor_bytes(module: nn.Module) -> int:
    """Exact bytes of a module's parameters, buffers and bitsandbytes quantisation statistics (each storage once)."""
    storages: dict[tuple[str, int], int] = {}

    def add(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()

    def add_state(state: Any) -> None:
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                add(value)
            elif hasattr(value, "absmax"):  # nested QuantState (double quantisation)
                add_state(value)

    for tensor in [*module.parameters(), *module.buffers()]:
        add(tensor)
        if getattr(tensor, "quant_state", None) is not None:
            add_state(tensor.quant_state)
        if isinstance(getattr(tensor, "SCB", None), torch.Tensor):
            add(tensor.SCB)
    for part in module.modules():  # Linear8bitLt moves its row scales to `state` on the first forward
        if hasattr(getattr(part, "state", None), "SCB"):
            add_state(part.state)
    return sum(storages.values())


def apply_base_storage(
    denoiser: nn.Module,
    storage: str,
    *,
    compute_dtype: torch.dtype,
    spec_patterns: Sequence[str],
    device: torch.device | str = "cpu",
) -> BaseStorage:
    """Store the frozen Linear weights of `denoiser` as `storage` (after LoRA injection); returns what changed.

    `compute_dtype` is the dtype the other frozen weights are stored in; quantised layers are quantised on `device`.
    The report is also kept on the denoiser (`applied_storage`).
    """
    if storage not in BASE_STORAGES:
        raise ValueError(f"unknown base storage {storage!r}; choose one of {', '.join(BASE_STORAGES)}")
    if storage == "default":
        report = BaseStorage(storage, 0, 0, 0, 0)
        object.__setattr__(denoiser, _REPORT, report)
        return report
    layers, kept = frozen_linears(denoiser, skip_patterns(denoiser, spec_patterns))
    before = sum(tensor_bytes(layer) - _bias_bytes(layer) for _, layer in layers)
    after = 0
    if storage in FP8_DTYPES:
        from diffusers.hooks import HookRegistry

        for _, layer in layers:
            HookRegistry.check_if_exists_or_initialize(layer).register_hook(
                _fp8_hook(FP8_DTYPES[storage], compute_dtype), _HOOK_NAME
            )
            after += tensor_bytes(layer) - _bias_bytes(layer)
    else:
        modules = dict(denoiser.named_modules())
        for name, layer in layers:
            parent, _, child = name.rpartition(".")
            quantised = _quantise(layer, storage, compute_dtype, torch.device(device))
            setattr(modules[parent] if parent else denoiser, child, quantised)
            after += tensor_bytes(quantised) - _bias_bytes(quantised)
    # DDP would broadcast every parameter at wrap time (gloo has no fp8); the converted weights are frozen and
    # loaded and converted identically by every process, so DDP leaves them alone.
    ignored = [*getattr(denoiser, "_ddp_params_and_buffers_to_ignore", ()), *(f"{name}.weight" for name, _ in layers)]
    denoiser._ddp_params_and_buffers_to_ignore = ignored
    report = BaseStorage(storage, len(layers), kept, before, after)
    object.__setattr__(denoiser, _REPORT, report)
    return report


def applied_storage(denoiser: nn.Module) -> BaseStorage | None:
    """The report of `apply_base_storage` on this denoiser (None: never applied)."""
    return getattr(denoiser, _REPORT, None)


def _bias_bytes(layer: nn.Module) -> int:
    bias = getattr(layer, "bias", None)
    return 0 if bias is None else bias.numel() * bias.element_size()


def _quantise(layer: nn.Linear, storage: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A bitsandbytes layer holding `layer`'s weight quantised on `device` (built on the meta device: no RNG use)."""
    import bitsandbytes as bnb

    bias = layer.bias is not None
    weight = layer.weight.data
    if storage == "nf4":
        quantised = bnb.nn.Linear4bit(
            layer.in_features, layer.out_features, bias, compute_dtype, quant_type="nf4", device="meta"
        )
        quantised.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=quantised)
        # On CPUs with AVX512-BF16, bitsandbytes repacks the weight for inference on the first eval forward, and
        # training afterwards fails ("a view of a leaf Variable ..."): keep the one layout training can use.
        quantised.support_avx512bf16_for_cpu = False
    else:
        quantised = bnb.nn.Linear8bitLt(
            layer.in_features,
            layer.out_features,
            bias,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        quantised.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias:
        quantised.bias = nn.Parameter(layer.bias.data, requires_grad=False)
    quantised.train(layer.training)
    quantised.register_forward_hook(_autocast_output)
    return quantised.to(device)


def _autocast_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """bitsandbytes returns the input's dtype; under autocast a Linear returns the autocast dtype, which the next
    layer may rely on (e.g. a LayerNorm stored in bf16)."""
    device = output.device.type
    if torch.is_autocast_enabled(device):
        return output.to(torch.get_autocast_dtype(device))
    return output
