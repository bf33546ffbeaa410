"""`dittune sample --low-vram`: encode the prompts, free the text encoders, then denoise and decode.

The text encoders are loaded through the spec (`load_text_encoders`, `encode_prompts`), used for the prompt and the
negative prompt, and released before the denoiser loads; the pipeline is the one validation uses
(`ModelSpec.build_pipeline`: every text encoder and tokenizer None) and takes the embeddings as arguments
(`embedding_kwargs`), with the VAE's tiling and slicing on. On CUDA the pipeline runs under diffusers' model CPU
offload (one model on the GPU at a time), and when bitsandbytes is installed the T5-type text encoders are loaded
in 8 bits. `PeakMemory` measures what the sampling took. Family-free: everything goes through the spec.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import weakref
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from dittune.cache.build import release_memory
from dittune.models.base import ModelSpec, TextEmbedding

MIB = 1024 * 1024


def eight_bit_available(device: torch.device) -> bool:
    """8-bit T5 is used on CUDA when bitsandbytes is installed (`pip install "dittune[bnb]"`)."""
    return device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None


def encoder_modules(encoders: Any) -> list[nn.Module]:
    """The modules an encoder object (`ModelSpec.load_text_encoders`) holds: its attributes that are modules, or
    tuples / lists of them."""
    found: list[nn.Module] = []
    for value in vars(encoders).values() if hasattr(encoders, "__dict__") else ():
        items = value if isinstance(value, (tuple, list)) else (value,)
        found += [item for item in items if isinstance(item, nn.Module)]
    return found


def quantize_t5_8bit(encoders: Any) -> list[str]:
    """Swap the Linear layers of every T5-type encoder (transformers classes named *T5*: T5, mT5, UMT5) in the
    encoder object for bitsandbytes `Linear8bitLt` layers; returns the classes converted.

    Layers the class keeps in fp32 (`_keep_in_fp32_modules`, T5's `wo`) stay as they are, as transformers' own
    8-bit loading does. The weights are quantised when the module moves to its device."""
    converted = []
    for module in encoder_modules(encoders):
        if "T5" not in type(module).__name__:
            continue
        keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
        for parent in list(module.modules()):
            for name, layer in list(parent.named_children()):
                if type(layer) is nn.Linear and name not in keep:
                    setattr(parent, name, _linear_8bit(layer))
        converted.append(type(module).__name__)
    return converted


def _linear_8bit(layer: nn.Linear) -> nn.Module:
    """A bitsandbytes `Linear8bitLt` holding `layer`'s weights (quantised when it moves to a device)."""
    import bitsandbytes as bnb

    bias = layer.bias is not None
    replacement = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias, has_fp16_weights=False)
    replacement.weight = bnb.nn.Int8Params(layer.weight.data, requires_grad=False, has_fp16_weights=False)
    if bias:
        replacement.bias = nn.Parameter(layer.bias.data, requires_grad=False)
    return replacement


def load_encoders(spec: ModelSpec, device: torch.device, dtype: torch.dtype, eight_bit: bool) -> tuple[Any, list[str]]:
    """The spec's text encoders on `device`; with `eight_bit`, loaded on the CPU, their T5-type encoders swapped
    to 8-bit layers (`quantize_t5_8bit`) and then moved (and so quantised). Returns them and the classes
    converted."""
    if not eight_bit:
        return spec.load_text_encoders(device, dtype), []
    encoders = spec.load_text_encoders(torch.device("cpu"), dtype)
    converted = quantize_t5_8bit(encoders)
    for module in encoder_modules(encoders):
        module.to(device)
    if hasattr(encoders, "device"):
        encoders.device = device
    return encoders, converted


class PeakMemory:
    """Peak memory of a block of work: on CUDA `torch.cuda.max_memory_allocated`; on a CPU how far the process's
    resident set (RSS) rose above its size at the start (sampled every few milliseconds with psutil, and the
    kernel's high-water mark `ru_maxrss` when the block set a new one)."""

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device = device
        self.interval = interval
        self.peak_bytes = 0
        self.start_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0
        self._max_rss_start = 0

    @property
    def kind(self) -> str:
        return "cuda allocated" if self.device.type == "cuda" else "cpu RSS"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.start_bytes = self._sampled = _rss()
        self._max_rss_start = _max_rss()
        self._stop.clear()
        # the thread holds the meter weakly: a meter dropped without `__exit__` (an error on the way) ends it
        self._thread = threading.Thread(
            target=_sample_rss, args=(weakref.ref(self), self._stop, self.interval), name="dittune-peak-memory"
        )
        self._thread.daemon = True
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        max_rss = _max_rss()
        high_water = max_rss if max_rss > self._max_rss_start else 0  # the block set the process's record
        self.peak_bytes = max(0, max(self._sampled, _rss(), high_water) - self.start_bytes)

    def __del__(self) -> None:
        self._stop.set()

    def line(self) -> str:
        """The summary line: 'peak memory: X MiB (cuda allocated)' or 'peak memory: X MiB (cpu RSS, ...)'."""
        if self.device.type == "cuda":
            return f"peak memory: {self.peak_bytes / MIB:.1f} MiB ({self.kind})"
        before = self.start_bytes / MIB
        return f"peak memory: {self.peak_bytes / MIB:.1f} MiB ({self.kind}, growth over the {before:.0f} MiB before)"


def _sample_rss(meter: weakref.ref[PeakMemory], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        alive = meter()
        if alive is None:
            return
        alive._sampled = max(alive._sampled, _rss())
        del alive


def _rss() -> int:
    try:
        import psutil
    except ImportError:  # psutil comes with accelerate; without it only the high-water mark is read
        return 0
    return psutil.Process().memory_info().rss


def _max_rss() -> int:
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # bytes on macOS, KiB on Linux


class LowVramSampling:
    """The steps of a low-memory `dittune sample`, in order: `load` (meter started, prompts encoded, encoders
    freed, pipeline without text encoders built), the caller's LoRA, `place`, `call_kwargs`, `finish`."""

    def __init__(
        self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, eight_bit: bool | None = None
    ) -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.eight_bit = eight_bit_available(device) if eight_bit is None else eight_bit
        self.meter = PeakMemory(device)
        self.text: tuple[TextEmbedding, TextEmbedding] | None = None

    def autocast(self) -> AbstractContextManager:
        """The autocast of the stock path (`dittune sample`): on for half precisions."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def encode(self, prompt: str, negative_prompt: str) -> tuple[TextEmbedding, TextEmbedding]:
        """Load the text encoders, encode both prompts (one at a time, as the pipeline does), free the encoders."""
        encoders, converted = load_encoders(self.spec, self.device, self.dtype, self.eight_bit)
        if converted:
            print(f"note: {', '.join(converted)} loaded in 8 bits (bitsandbytes)")
        with torch.no_grad(), self.autocast():
            positive, negative = (self.spec.encode_prompts(encoders, [text])[0] for text in (prompt, negative_prompt))
        del encoders
        release_memory()  # gc, and the CUDA cache back to the driver
        return positive, negative

    def load(self, prompt: str, negative_prompt: str, conditioned: bool) -> Any:
        """Start measuring, encode the prompts (`encode`), then build the pipeline around the denoiser, VAE (tiling
        and slicing on) and scheduler alone, all on the CPU."""
        self.meter.__enter__()
        self.text = self.encode(prompt, negative_prompt)
        spec = self.spec
        denoiser = spec.load_denoiser(self.dtype).eval().requires_grad_(False)
        vae = spec.load_vae(torch.device("cpu"), self.dtype)
        spec.configure_vae(vae, tiling=True)
        return spec.build_pipeline(denoiser, vae, spec.load_scheduler(), conditioned)

    def place(self, pipeline: Any) -> None:
        """On CUDA, model CPU offload (each model moves to the GPU for its own forward); elsewhere `.to(device)`."""
        if self.device.type == "cuda":
            pipeline.enable_model_cpu_offload(device=self.device)
        else:
            pipeline.to(self.device)

    def call_kwargs(
        self, *, width: int, height: int, frames: int, fps: float, image: Any | None = None
    ) -> dict[str, Any]:
        """Pipeline arguments: the embeddings (on the device), size and clip arguments."""
        if self.text is None:
            raise RuntimeError("LowVramSampling.load must run first")
        positive, negative = self.text
        kwargs = {
            **self.spec.embedding_kwargs(positive, negative),
            **self.spec.size_kwargs(width, height),
            **self.spec.clip_kwargs(frames, fps, image),
        }
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}

    def finish(self) -> str:
        """Stop measuring; the "peak memory: ..." line."""
        self.meter.__exit__(None, None, None)
        return self.meter.line()
