"""Training-step speed and memory of a Hunyuan-DiT at its real width, on a GPU, built offline.

The model is `HunyuanDiT2DModel` with the real v1.2 geometry (hidden 1408, 16 heads of 88, MLP ratio 4.3637,
text widths 1024/2048 at 77/256 tokens, learned sigma) and fewer blocks (`--layers`, default 8 of 40),
randomly initialised on the device: nothing is downloaded or read. A step is what dittune's trainer does
with a batch from the cache: `spec.compute_loss` (posterior sample, noise, timesteps, RoPE, forward, v-loss
+ VLB for full fine-tuning) under autocast, backward, gradient clipping (1.0), dittune's optimizer (AdamW,
fused) and zero_grad, on synthetic cached moments and text embeddings of the real shapes. LoRA: rank 16 on
the family's default targets, base weights in the compute dtype; full: fp32 weights.

For every method × precision × gradient checkpointing, the eager and the compiled (`train.compile`,
`dittune.models.compile.compile_blocks`) model are built from the same seed and timed in alternating rounds
in one process (the ratio carries over; absolute times vary with clocks and load). Peak memory is
`torch.cuda.max_memory_allocated` over the measured steps, counting only that model's allocations.
`benchmarks/gpu.sh` runs it; `--device cpu --tiny` is a quick smoke test of this script.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GIB = 1024**3
REAL = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 4,
    "num_attention_heads": 16,
    "attention_head_dim": 88,
    "hidden_size": 1408,
    "cross_attention_dim": 1024,
    "cross_attention_dim_t5": 2048,
    "pooled_projection_dim": 1024,
    "text_len": 77,
    "text_len_t5": 256,
    "mlp_ratio": 4.3637,
    "activation_fn": "gelu-approximate",
    "learn_sigma": True,
    "use_style_cond_and_image_meta_size": False,
}
"""Hunyuan-DiT v1.2's transformer config, less `num_layers` (40 in the released model)."""
TINY = {**REAL, "num_attention_heads": 2, "attention_head_dim": 16, "hidden_size": 32, "mlp_ratio": 2.0}
TINY |= {"cross_attention_dim": 32, "cross_attention_dim_t5": 32, "pooled_projection_dim": 16, "sample_size": 8}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class Config:
    method: str
    precision: str
    checkpointing: bool
    compiled: bool

    @property
    def name(self) -> str:
        parts = [self.method, self.precision, "ckpt" if self.checkpointing else "no-ckpt"]
        return " ".join([*parts, "compiled" if self.compiled else "eager"])


@dataclass
class Result:
    config: Config
    parameters: int = 0
    trainable: int = 0
    first_s: float = 0.0
    peak_gib: float | None = None
    loss: float = 0.0
    ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms)


# ------------------------------------------------------------------------------------------ model and step
def write_model_folder(folder: Path, transformer: dict[str, Any]) -> Path:
    """The two configs `HunyuanDiTSpec.compute_loss` reads (no weights: the model is built in memory)."""
    for name, config in (
        ("transformer", {"_class_name": "HunyuanDiT2DModel", **transformer}),
        ("vae", {"_class_name": "AutoencoderKL", "latent_channels": 4, "scaling_factor": 0.13025}),
    ):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def make_batch(spec: Any, batch: int, size: int, device: torch.device, seed: int) -> Any:
    """A cached-looking batch: posterior moments and both text embeddings with masks, real shapes."""
    from dittune.models.base import SampleMeta, TrainBatch

    cfg = spec.transformer_config
    g = torch.Generator().manual_seed(seed)
    latent = size // 8
    mask = torch.ones(batch, cfg["text_len"], dtype=torch.long)
    mask[:, 20:] = 0
    mask_t5 = torch.ones(batch, cfg["text_len_t5"], dtype=torch.long)
    mask_t5[:, 40:] = 0
    tensors = {
        "mean": torch.randn(batch, 4, latent, latent, generator=g) * 5,
        "logvar": torch.full((batch, 4, latent, latent), -6.0),
        "prompt_embeds": torch.randn(batch, cfg["text_len"], cfg["cross_attention_dim"], generator=g),
        "prompt_attention_mask": mask,
        "prompt_embeds_2": torch.randn(batch, cfg["text_len_t5"], cfg["cross_attention_dim_t5"], generator=g) * 0.2,
        "prompt_attention_mask_2": mask_t5,
    }
    tensors = {k: v.to(device) for k, v in tensors.items()}
    moments = {k: tensors.pop(k) for k in ("mean", "logvar")}
    meta = [SampleMeta((size, size), (size, size), (0, 0))] * batch
    return TrainBatch(moments=moments, text=tensors, meta=meta)


def build_model(spec: Any, config: Config, args: Any, device: torch.device) -> tuple[torch.nn.Module, list, Any]:
    """Denoiser (LoRA-injected or fully trainable), checkpointing and compile as `build_run` sets them up."""
    from diffusers import HunyuanDiT2DModel

    from dittune.config.schema import TrainSection
    from dittune.models.compile import compile_blocks
    from dittune.models.lora import inject_lora, lora_parameters
    from dittune.train.optim import build_optimizer

    torch.manual_seed(0)
    weight_dtype = PRECISIONS[config.precision] if config.method == "lora" else None
    with torch.device(device):
        model = HunyuanDiT2DModel(**{k: v for k, v in spec.transformer_config.items() if not k.startswith("_")})
    if config.method == "full":
        model.requires_grad_(True)
        trainable = list(model.parameters())
    else:
        model.to(weight_dtype or torch.float32).requires_grad_(False)
        inject_lora(model, rank=16, alpha=16.0, targets=list(spec.default_lora_targets))
        trainable = lora_parameters(model)
        for param in trainable:
            param.data = param.data.float()
            param.requires_grad_(True)
    if config.checkpointing:
        spec.enable_gradient_checkpointing(model)
    if config.compiled:
        compile_blocks(spec, model, **args.compile_options)
    model.to(device).train()
    return model, trainable, build_optimizer(trainable, TrainSection(max_steps=1000))


def step_fn(spec: Any, model: torch.nn.Module, trainable: list, optimizer: Any, config: Config, args: Any) -> Any:
    """One training step on a fixed cached batch; returns a function giving the loss."""
    from diffusers import DDPMScheduler

    device = next(model.parameters()).device
    batch = make_batch(spec, args.batch_size, args.size, device, seed=1)
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.018, prediction_type="v_prediction"
    )
    settings = spec.default_loss_settings(config.method)
    generator = torch.Generator(device=device).manual_seed(2)
    autocast_dtype = PRECISIONS[config.precision]

    def step() -> float:
        autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with autocast:
            out = spec.compute_loss(model, scheduler, batch, generator, settings)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step


# ------------------------------------------------------------------------------------------ measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], steps: int, device: torch.device) -> tuple[float, float]:
    """(ms per step, last loss) over `steps` consecutive steps."""
    synchronize(device)
    started = time.perf_counter()
    loss = None
    for _ in range(steps):
        loss = fn()
    synchronize(device)
    return (time.perf_counter() - started) * 1000 / steps, float(loss)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def peak_over(fn: Callable[[], Any], steps: int, device: torch.device, resident: int) -> float | None:
    """Peak allocated GiB during `steps` steps, less `resident` bytes held by another model."""
    if device.type != "cuda":
        timed(fn, steps, device)
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    timed(fn, steps, device)
    return (torch.cuda.max_memory_allocated(device) - resident) / GIB


def measure_pair(spec: Any, method: str, precision: str, ckpt: bool, args: Any, device: torch.device, log: Any):
    """Eager and compiled model of one configuration: first step, peak memory, alternating timing rounds."""
    import torch._dynamo

    torch._dynamo.reset()  # each pair compiles afresh (variants of earlier pairs would count against the limit)
    results, steps = [], []
    for compiled in (False, True):
        config = Config(method, precision, ckpt, compiled)
        resident = allocated(device)  # the other model of the pair (0 for the first)
        model, trainable, optimizer = build_model(spec, config, args, device)
        step = step_fn(spec, model, trainable, optimizer, config, args)
        result = Result(config, sum(p.numel() for p in model.parameters()), sum(p.numel() for p in trainable))
        first_ms, result.loss = timed(step, 1, device)  # the compiled model compiles here
        result.first_s = first_ms / 1000
        if args.warmup:
            timed(step, args.warmup, device)
        result.peak_gib = peak_over(step, args.memory_steps, device, resident)
        log(f"  {config.name}: first step {result.first_s:.1f} s, loss {result.loss:.4f}")
        results.append(result)
        steps.append(step)
    for index in range(args.rounds):
        order = (0, 1) if index % 2 == 0 else (1, 0)
        for which in order:
            results[which].ms.append(timed(steps[which], args.steps, device)[0])
    eager, compiled = results
    log(
        f"  {method} {precision} {'ckpt' if ckpt else 'no-ckpt'}: eager {eager.median_ms:.1f} ms, compiled "
        f"{compiled.median_ms:.1f} ms, ratio {compiled.median_ms / eager.median_ms:.3f}"
    )
    return results


# ------------------------------------------------------------------------------------------ reporting
def results_table(results: list[Result], batch: int) -> str:
    lines = [
        "| method | precision | grad ckpt | compile | ms/step | samples/s | peak GiB | first step s "
        "| compiled ÷ eager, median [min–max] per round |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for eager, compiled in zip(results[::2], results[1::2]):
        rounds = [c / e for c, e in zip(compiled.ms, eager.ms)]
        spread = f"**{compiled.median_ms / eager.median_ms:.3f}** [{min(rounds):.3f}–{max(rounds):.3f}]"
        for result in (eager, compiled):
            c = result.config
            peak = f"{result.peak_gib:.2f}" if result.peak_gib is not None else "n/a"
            lines.append(
                f"| {c.method} | {c.precision} | {'on' if c.checkpointing else 'off'} "
                f"| {'on' if c.compiled else 'off'} | {result.median_ms:.1f} | {1000 * batch / result.median_ms:.2f} "
                f"| {peak} | {result.first_s:.1f} | {spread if c.compiled else ''} |"
            )
    return "\n".join(lines)


def machine_lines(device: torch.device) -> list[str]:
    lines = [f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.insert(0, f"GPU: {props.name}, {props.total_memory / GIB:.0f} GiB, CUDA {torch.version.cuda}")
    else:
        lines.insert(0, f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test only)")
    parser.add_argument("--tiny", action="store_true", help="tiny width (hidden 32) instead of the real 1408")
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks (default 8; the real model: 40)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024 → 4096 tokens)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per step (default 1)")
    parser.add_argument("--methods", default="lora,full", help="comma list of lora, full")
    parser.add_argument("--precisions", default="bf16,fp32", help="comma list of bf16, fp32")
    parser.add_argument("--checkpointing", default="off,on", help="comma list of off, on")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round (default 3)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating eager/compiled rounds (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (default 2)")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps over which peak memory is taken")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--mode", help="torch.compile mode (default: torch's default)")
    parser.add_argument("--write", type=Path, nargs="?", const=RESULTS_DIR / "gpu-cuda.md", help="results file")
    args = parser.parse_args(argv)
    args.method_list = _choices(parser, "--methods", args.methods, ("lora", "full"))
    args.precision_list = _choices(parser, "--precisions", args.precisions, tuple(PRECISIONS))
    args.ckpt_list = [v == "on" for v in _choices(parser, "--checkpointing", args.checkpointing, ("off", "on"))]
    if args.size % 16:
        parser.error("--size must be a multiple of 16")
    args.compile_options = {"backend": args.backend, **({"mode": args.mode} if args.mode else {})}
    return args


def _choices(parser: argparse.ArgumentParser, flag: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    for item in items:
        if item not in allowed:
            parser.error(f"{flag}: unknown value {item!r} (choose from {', '.join(allowed)})")
    return items


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"error: torch {torch.__version__} sees no CUDA GPU (torch.version.cuda = {torch.version.cuda}). "
            "Install a CUDA build of torch in this environment first, or use --device cpu --tiny for a smoke test.",
            file=sys.stderr,
        )
        return 2
    from dittune.models.hunyuan_dit.spec import HunyuanDiTSpec

    command = os.environ.get("DITTUNE_BENCH_COMMAND") or shlex.join(
        ["python", "benchmarks/gpu_step.py", *(sys.argv[1:] if argv is None else argv)]
    )
    transformer = {**(TINY if args.tiny else REAL), "num_layers": args.layers}

    def log(line: str) -> None:
        print(line, flush=True)

    started = time.perf_counter()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="dittune-gpu-") as folder:
        spec = HunyuanDiTSpec(write_model_folder(Path(folder), transformer))
        for method, precision, ckpt in itertools.product(args.method_list, args.precision_list, args.ckpt_list):
            log(f"{method} {precision} {'ckpt' if ckpt else 'no-ckpt'}:")
            results += measure_pair(spec, method, precision, ckpt, args, device, log)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    total_s = time.perf_counter() - started
    tokens = (args.size // 16) ** 2
    width = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    setup = (
        f"HunyuanDiT2DModel v1.2 geometry, hidden {width} ({transformer['num_attention_heads']} heads of "
        f"{transformer['attention_head_dim']}), {args.layers} blocks, "
        f"{results[0].parameters / 1e6:.0f} M parameters; {args.size}×{args.size} images → {tokens} image "
        f"tokens + 77/256 text tokens; batch {args.batch_size}; LoRA rank 16 on "
        f"{'/'.join(HunyuanDiTSpec.default_lora_targets)} ({results[0].trainable / 1e6:.1f} M trainable); "
        f"AdamW; clip 1.0; torch.compile {args.compile_options}; {args.rounds} rounds × {args.steps} steps"
    )
    table = results_table(results, args.batch_size)
    log("")
    log(table)
    log(f"\nwall time {total_s:.0f} s")
    if args.write:
        body = [
            f"# Training step on {device.type}: checkpointing, precision, compile",
            "",
            f"- date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            *(f"- {line}" for line in machine_lines(device)),
            f"- command: `{command}`",
            f"- setup: {setup}",
            f"- wall time: {total_s:.0f} s",
            "",
            "ms/step: median over the rounds; samples/s = batch ÷ that; peak GiB: `torch.cuda.max_memory_allocated` "
            "over the measured steps, this model only; first step: includes compiling (inductor cache as found). "
            "compiled ÷ eager below 1: the compiled step is faster. See benchmarks/README.md.",
            "",
            table,
        ]
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text("\n".join(body) + "\n", encoding="utf-8")
        log(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
