"""Block offloading (`train.blocks_to_swap`): peak GPU memory and step time against the number of swapped blocks,
with and without prefetch, on a GPU.

The model is Flux's `FluxTransformer2DModel` at its real width (24 heads of 128 = 3072) with fewer blocks
(`--double`, `--single`; default 4 + 8 of 19 + 38, 2.5 B parameters), random bf16 weights built on the CPU (no
download), LoRA rank 16 on the family's default targets (fp32). The tiny Flux pipeline (`dittune tiny flux`)
provides the scheduler, the text encoders and the VAE that make one fixed batch (`--size`² images, so
(size/16)² image tokens + 512 text tokens; the text widths are the tiny encoders'). A step is what the trainer
does: `spec.compute_loss` under bf16 autocast, backward, AdamW, zero_grad.

Every setting starts from a copy of the same CPU model, as `build_run` orders it: gradient checkpointing of every
block (the spec's switch, `train.gradient_checkpointing = true`; swapped blocks are recomputed in any case),
`offload_blocks`, `.to(device)`. Per setting: the weights on the device after placing the model
(`memory_allocated`), the peak over the measured steps (`max_memory_allocated`), both above what was allocated
before, and the median step time over `--steps` steps (synchronised) after `--warmup` steps. Settings run one
after the other (each model is freed before the next is placed). One extra row without checkpointing and
without swapping shows what recomputation itself costs.

On a machine without CUDA it stops with a message. `--device cpu` measures the only thing a CPU can: the time the
offload adds to a step when storage and compute are both the CPU (hooks, plus a memcpy of each swapped weight
per use), on a small model; it prints no memory, as nothing is saved there.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GIB = 2**30
REAL = {"num_attention_heads": 24, "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56)}
"""Flux.1's width; the tiny pipeline's in/out channels, text widths and guidance embedding are kept."""
SMALL = {"num_attention_heads": 4, "attention_head_dim": 32, "axes_dims_rope": (8, 12, 12)}
"""`--device cpu`: a width a CPU steps in well under a second."""


@dataclass
class Setting:
    swapped: int
    prefetch: bool = True
    checkpointing: bool = True

    @property
    def name(self) -> str:
        if not self.checkpointing:
            return "0 (no checkpointing)"
        return "0" if not self.swapped else f"{self.swapped}{'' if self.prefetch else ', no prefetch'}"


@dataclass
class Measured:
    setting: Setting
    placed: float | None
    peak: float | None
    ms: float


def build(args: argparse.Namespace, device: torch.device, root: Path) -> tuple[Any, torch.nn.Module, Any]:
    """The tiny Flux pipeline's spec (built in `root`), the wider LoRA transformer on the CPU, and one batch on
    `device`."""
    from dittune.models.base import SampleMeta, TrainBatch
    from dittune.models.lora import inject_lora
    from dittune.models.registry import spec_class, tiny_builder

    folder = tiny_builder("flux")(root / "flux", seed=0)
    spec = spec_class("flux")(folder)
    cpu = torch.device("cpu")
    prompts = [f"a red ball number {index}" for index in range(args.batch)]
    text = spec.encode_prompts(spec.load_text_encoders(cpu, torch.float32), prompts)
    pixels = torch.rand(args.batch, 3, 1, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        moments = spec.encode_pixels(spec.load_vae(cpu, torch.float32), pixels)
    meta = SampleMeta((args.size, args.size), (args.size, args.size), (0, 0))
    batch = TrainBatch(
        moments={k: torch.stack([m[k] for m in moments]).to(device) for k in moments[0]},
        text={k: torch.stack([t[k] for t in text]).to(device) for k in text[0]},
        meta=[meta] * args.batch,
    )
    tiny = spec.load_denoiser(torch.float32)
    config = {**dict(tiny.config), **(REAL if device.type == "cuda" else SMALL)}
    config.update(num_layers=args.double, num_single_layers=args.single)
    torch.manual_seed(0)
    model = type(tiny).from_config(config).to(weight_dtype(device))
    model.requires_grad_(False)
    inject_lora(model, rank=16, alpha=16.0, targets=list(spec.default_lora_targets))
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    return spec, model.train(), batch


def weight_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device)


class Stepper:
    """A copy of the base model placed with one setting, its optimizer, and one training step."""

    def __init__(self, spec: Any, base: torch.nn.Module, batch: Any, setting: Setting, device: torch.device) -> None:
        from dittune.models.block_offload import offload_blocks

        self.spec, self.batch, self.setting, self.device = spec, batch, setting, device
        self.model = copy.deepcopy(base)
        if setting.checkpointing:
            spec.enable_partial_checkpointing(self.model, 1.0)
        if setting.swapped:
            offload_blocks(spec, self.model, setting.swapped, device=device, prefetch=setting.prefetch)
        self.model.to(device)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.scheduler, self.settings = spec.load_scheduler(), spec.default_loss_settings("lora")
        self.steps = 0
        self.times: list[float] = []

    def __call__(self) -> float:
        """One step; its seconds (synchronised)."""
        from dittune.models.draws import SampleDraws

        started = time.perf_counter()
        draws = SampleDraws(0, self.steps, list(range(self.batch.size)), self.device)
        with torch.autocast(self.device.type, weight_dtype(self.device), enabled=self.device.type == "cuda"):
            out = self.spec.compute_loss(self.model, self.scheduler, self.batch, draws, self.settings)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        self.steps += 1
        return time.perf_counter() - started


def measure_on_gpu(spec: Any, base: torch.nn.Module, batch: Any, setting: Setting, args: Any, device: torch.device):
    """Place a copy of `base` with `setting` alone on the GPU, step it, and free it again."""
    gc.collect()
    torch.cuda.empty_cache()
    before = allocated(device)
    stepper = Stepper(spec, base, batch, setting, device)
    placed = allocated(device) - before
    for _ in range(args.warmup):
        stepper()
    torch.cuda.reset_peak_memory_stats(device)
    times = [stepper() for _ in range(args.steps)]
    peak = torch.cuda.max_memory_allocated(device) - before
    return Measured(setting, placed / GIB, peak / GIB, statistics.median(times) * 1e3)


def measure_on_cpu(spec: Any, base: torch.nn.Module, batch: Any, chosen: list[Setting], args: Any) -> list[Measured]:
    """Every setting side by side, timed in alternating rounds (one step each, the order reversed every round)."""
    steppers = [Stepper(spec, base, batch, setting, torch.device("cpu")) for setting in chosen]
    for stepper in steppers:
        for _ in range(args.warmup):
            stepper()
    for round_index in range(args.steps):
        for stepper in steppers if round_index % 2 == 0 else reversed(steppers):
            stepper.times.append(stepper())
    return [Measured(s.setting, None, None, statistics.median(s.times) * 1e3) for s in steppers]


def settings(args: argparse.Namespace) -> list[Setting]:
    total = args.double + args.single
    quarters = range(5) if args.device == "cuda" else (0, 2, 4)
    counts = sorted({int(c) for c in args.swaps.split(",")}) if args.swaps else [total * q // 4 for q in quarters]
    if any(not 0 <= c <= total for c in counts):
        raise SystemExit(f"--swaps: each count must be in 0..{total}")
    chosen = [Setting(0, checkpointing=False)] if args.device == "cuda" else []
    for count in counts:
        chosen.append(Setting(count))
        if count and args.device == "cuda":
            chosen.append(Setting(count, prefetch=False))
    return chosen


def table(results: list[Measured], total: int, device: torch.device) -> str:
    reference = next(r.ms for r in results if r.setting.checkpointing and not r.setting.swapped)
    if device.type == "cuda":
        lines = [
            f"| blocks_to_swap (of {total}) | weights on the GPU GiB | peak GiB | ms/step | ÷ no swap |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in results:
            lines.append(f"| {r.setting.name} | {r.placed:.2f} | {r.peak:.2f} | {r.ms:.0f} | {r.ms / reference:.2f} |")
        return "\n".join(lines)
    lines = [f"| blocks_to_swap (of {total}) | ms/step | ÷ no swap |", "| --- | ---: | ---: |"]
    lines += [f"| {r.setting.name} | {r.ms:.1f} | {r.ms / reference:.3f} |" for r in results]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (default); cpu: overhead only")
    parser.add_argument("--double", type=int, help="double-stream blocks (default 4 on cuda, 2 on cpu)")
    parser.add_argument("--single", type=int, help="single-stream blocks (default 8 on cuda, 2 on cpu)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 512 on cuda, 64 on cpu)")
    parser.add_argument("--batch", type=int, default=1, help="images per step (default 1)")
    parser.add_argument("--swaps", help="comma list of blocks_to_swap (default 0, ¼, ½, ¾ and all of the blocks)")
    parser.add_argument("--steps", type=int, help="timed steps (CPU: rounds) per setting (default 5; CPU 12)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per setting first (default 2)")
    parser.add_argument("--write", type=Path, nargs="?", const=True, help="write results/block_offload-<dev>.md")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.double = args.double if args.double is not None else (4 if cuda else 2)
    args.single = args.single if args.single is not None else (8 if cuda else 2)
    args.size = args.size or (512 if cuda else 64)
    args.steps = args.steps or (5 if cuda else 12)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"error: no CUDA GPU (torch {torch.__version__}, torch.version.cuda = {torch.version.cuda}): block "
            "offloading saves GPU memory, which only a GPU can show. `--device cpu` measures the offload's time "
            "overhead on a CPU instead.",
            file=sys.stderr,
        )
        return 2
    from trainer_overhead import machine_line

    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="dittune-offload-") as root:
        spec, base, batch = build(args, device, Path(root))
        if device.type == "cuda":
            results = []
            for setting in settings(args):
                results.append(measure_on_gpu(spec, base, batch, setting, args, device))
                print(f"blocks_to_swap {setting.name}: {results[-1].ms:.1f} ms/step", flush=True)
        else:
            results = measure_on_cpu(spec, base, batch, settings(args), args)
    total = args.double + args.single
    params = sum(p.numel() for n, p in base.named_parameters() if ".lora_" not in n)
    heads, dims = base.config.num_attention_heads, base.config.attention_head_dim
    command = shlex.join(argv if argv is not None else sys.argv[1:])
    steps = f"median of {args.steps} steps after {args.warmup}"
    if device.type == "cpu":
        steps = f"median of {args.steps} alternating rounds of one step each after {args.warmup}"
    text = "\n".join(
        [
            f"# Block offloading ({device.type})",
            "",
            f"- machine: {machine_line(device)}",
            f"- date: {dt.date.today().isoformat()}",
            f"- command: `python benchmarks/block_offload_gpu.py {command}`",
            f"- model: FluxTransformer2DModel {heads} heads × {dims}, {args.double} double- + {args.single} "
            f"single-stream blocks, {params / 1e6:,.1f} M base parameters ({weight_dtype(device)}), LoRA rank 16; "
            f"batch {args.batch} of {args.size}² ({(args.size // 16) ** 2} image + 512 text tokens); {steps}",
            "- every row but the first recomputes every block in backward (gradient checkpointing)"
            if device.type == "cuda"
            else "- CPU: storage and compute are both the CPU, so this is the offload's time overhead (hooks and a "
            "memcpy of each swapped weight per use) and nothing else; no memory is saved and none is shown",
            "",
            table(results, total, device),
            "",
        ]
    )
    print(text)
    if args.write:
        path = args.write if isinstance(args.write, Path) else RESULTS_DIR / f"block_offload-{device.type}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
