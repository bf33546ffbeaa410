"""Gradient checkpointing by ratio (`train.gradient_checkpointing_ratio`): activation memory saved, step time paid.

One image family (Hunyuan-DiT, dittune's own block checkpointing at every ratio) and one video family
(HunyuanVideo, diffusers' switch at ratio 1), each at a mid-size tiny config, LoRA on a fixed batch. For every
setting — off, ratio 0.25, 0.5, 1 (`ModelSpec.enable_partial_checkpointing`, as a run does it) and, for the
choice of blocks, half of them placed last or spread out, and every block through dittune's own checkpointing —
on a copy of the same model:

- saved: bytes autograd keeps for backward after the forward, each storage once (`SavedActivations`: the
  saved-tensor hooks plus the checkpoints' inputs; deterministic);
- retained / peak: allocator-level bytes above the step's start, read from glibc (`mallinfo2`) after every aten
  op of forward, backward and recomputation (a `TorchDispatchMode`): retained at the end of the forward, peak
  over forward + backward. One untimed pass each (the first after a warm-up step);
- step: forward + loss + backward + AdamW step + zero_grad, timed in alternating rounds; figures are ratios
  to "off" in the same run.

Run `python benchmarks/gradient_checkpointing.py --help`.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime as dt
import hashlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from trainer_overhead import machine_line, quiet, with_larger_transformer, write_results
from trainer_overhead import transformer_config as image_transformer_config
from video import transformer_config as video_transformer_config

from dittune.models.base import ModelSpec, SampleMeta, TrainBatch
from dittune.models.checkpointing import SavedActivations, checkpointed_count, enable_block_checkpointing
from dittune.models.lora import inject_lora
from dittune.models.registry import spec_class

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 2**20
RATIOS = (0.25, 0.5, 1.0)
PLACEMENTS = ("last", "spread")
"""Other choices of blocks for ratio 0.5, measured for memory only (the same work as the first half)."""


# ------------------------------------------------------------------------------------------ allocator
class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _libc_live() -> Callable[[], int] | None:
    """Bytes in use from glibc's malloc (arena + mmapped chunks), where glibc ≥ 2.33 provides mallinfo2."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def live() -> int:
        info = mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return live


LIVE = _libc_live()


class PeakAfterEachOp(TorchDispatchMode):
    """Highest allocator reading after any aten op run inside it (backward and recomputation included)."""

    def __init__(self, live: Callable[[], int]) -> None:
        super().__init__()
        self.live = live
        self.peak = live()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.live())
        return out


# ------------------------------------------------------------------------------------------ workloads
@dataclass
class Workload:
    name: str
    family: str
    variant: str
    config: dict[str, Any]
    frames: int
    size: int
    describe: str


def workloads(args: argparse.Namespace) -> list[Workload]:
    image = image_transformer_config(args.hidden, args.layers, args.size)
    video = video_transformer_config(args.video_heads, args.video_layers)
    return [
        Workload(
            "image", "hunyuan-dit", "v1.2", image, 1, args.size,
            f"Hunyuan-DiT (HunyuanDiT2DModel hidden {args.hidden}, {args.layers} blocks, heads of 64); "
            f"{args.size}×{args.size} images → {(args.size // 16) ** 2} image tokens + 77/256 text tokens",
        ),
        Workload(
            "video", "hunyuan-video", "t2v", video, args.frames, args.video_size,
            f"HunyuanVideo ({args.video_heads}×64 heads, {args.video_layers} double- + {args.video_layers} "
            f"single-stream blocks); clips of {args.frames} frames at {args.video_size}×{args.video_size} → "
            f"{((args.frames - 1) // 4 + 1) * (args.video_size // 16) ** 2} video tokens",
        ),
    ]  # fmt: skip


def make_batch(spec: ModelSpec, frames: int, size: int, batch: int) -> TrainBatch:
    """`batch` samples of random pixels through the family's own (tiny) text encoders and VAE."""
    cpu = torch.device("cpu")
    prompts = [f"sample {index}: a red ball rolling to the right" for index in range(batch)]
    text = spec.encode_prompts(spec.load_text_encoders(cpu, torch.float32), prompts)
    pixels = torch.rand(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        moments = spec.encode_pixels(spec.load_vae(cpu, torch.float32), pixels)
    meta = SampleMeta((size, size), (size, size), (0, 0), frames=frames, fps=24.0 if frames > 1 else None)
    return TrainBatch(
        moments={k: torch.stack([m[k] for m in moments]) for k in moments[0]},
        text={k: torch.stack([t[k] for t in text]) for k in text[0]},
        meta=[meta] * batch,
    )


def lora_denoiser(spec: ModelSpec, dtype: torch.dtype, rank: int) -> torch.nn.Module:
    model = spec.load_denoiser(dtype)
    model.requires_grad_(False)
    inject_lora(model, rank=rank, alpha=float(rank), targets=list(spec.default_lora_targets))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    return model.train()


# ------------------------------------------------------------------------------------------ settings
@dataclass
class Setting:
    label: str
    blocks: int
    model: torch.nn.Module
    optimizer: Any
    timed: bool
    saved: int = 0
    retained: int | None = None
    peak: int | None = None
    ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)


def make_settings(spec: ModelSpec, base: torch.nn.Module, diffusers_switch: bool) -> list[Setting]:
    total = len(spec.transformer_blocks(base))
    settings = []

    def add(label: str, timed: bool, enable: Callable[[torch.nn.Module], int]) -> None:
        model = copy.deepcopy(base)
        blocks = enable(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        settings.append(Setting(label, blocks, model, optimizer, timed))

    def some(pick: Callable[[list], list]) -> Callable[[torch.nn.Module], int]:
        def enable(model: torch.nn.Module) -> int:
            chosen = pick(spec.transformer_blocks(model))
            enable_block_checkpointing(chosen)
            return len(chosen)

        return enable

    add("off", True, lambda model: 0)
    for ratio in RATIOS:
        add(f"ratio {ratio:g}", True, lambda model, r=ratio: spec.enable_partial_checkpointing(model, r))
    half = checkpointed_count(0.5, total)
    add("0.5, last blocks", False, some(lambda blocks: blocks[-half:]))
    add("0.5, spread", False, some(lambda blocks: blocks[:: max(1, total // half)][:half]))
    if diffusers_switch:
        add("1, dittune's own", True, some(lambda blocks: blocks))
    return settings


def step_fn(spec: ModelSpec, setting: Setting, batch: TrainBatch, autocast: bool) -> Callable[[], None]:
    scheduler = spec.load_scheduler()
    loss_settings = spec.default_loss_settings("lora")

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = spec.compute_loss(setting.model, scheduler, batch, torch.Generator().manual_seed(7), loss_settings)
        out.loss.backward()
        setting.optimizer.step()
        setting.optimizer.zero_grad(set_to_none=True)

    return step


def measure_memory(spec: ModelSpec, setting: Setting, batch: TrainBatch, autocast: bool) -> None:
    scheduler = spec.load_scheduler()
    loss_settings = spec.default_loss_settings("lora")
    blocks = spec.transformer_blocks(setting.model)

    def forward() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return spec.compute_loss(
                setting.model, scheduler, batch, torch.Generator().manual_seed(7), loss_settings
            ).loss

    with SavedActivations(setting.model, blocks) as saved:
        loss = forward()
    loss.backward()
    setting.model.zero_grad(set_to_none=True)
    setting.saved = saved.bytes
    if LIVE is None:
        return
    del loss
    start = LIVE()
    with PeakAfterEachOp(LIVE) as peak:
        loss = forward()
        retained = LIVE() - start
        loss.backward()
    setting.model.zero_grad(set_to_none=True)
    setting.retained, setting.peak = retained, peak.peak - start


def time_rounds(settings: list[Setting], steps: dict[str, Callable[[], None]], rounds: int, log: Callable) -> None:
    timed = [s for s in settings if s.timed]
    for setting in timed:  # warm-up (optimizer state, allocator, oneDNN kernels)
        steps[setting.label]()
    for index in range(rounds):
        order = timed if index % 2 == 0 else timed[::-1]
        for setting in order:
            wall, cpu = time.perf_counter(), time.process_time()
            steps[setting.label]()
            setting.ms.append((time.perf_counter() - wall) * 1000)
            setting.cpu_ms.append((time.process_time() - cpu) * 1000)
        log(f"  round {index + 1}/{rounds}: " + ", ".join(f"{s.label} {s.ms[-1]:.0f} ms" for s in timed))


# ------------------------------------------------------------------------------------------ report
def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def _share(value: int | float | None, reference: int | float | None) -> str:
    return "n/a" if value is None or not reference else f"{value / reference:.3f}"


def table(settings: list[Setting], total: int) -> str:
    off = settings[0]
    off_ms, off_cpu = statistics.median(off.ms), statistics.median(off.cpu_ms)
    lines = [
        "| checkpointing | blocks | saved for backward MiB | ÷ off | retained after forward MiB | ÷ off "
        "| peak MiB (fwd + bwd) | ÷ off | step ms | **step ÷ off** | CPU-time ÷ off |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in settings:
        ms = statistics.median(s.ms) if s.ms else None
        cpu = statistics.median(s.cpu_ms) if s.cpu_ms else None
        lines.append(
            f"| {s.label} | {s.blocks}/{total} | {_mib(s.saved)} | {_share(s.saved, off.saved)} | {_mib(s.retained)} "
            f"| {_share(s.retained, off.retained)} | {_mib(s.peak)} | {_share(s.peak, off.peak)} "
            f"| {'—' if ms is None else f'{ms:.0f}'} | **{_share(ms, off_ms) if ms else '—'}** "
            f"| {_share(cpu, off_cpu) if cpu else '—'} |"
        )
    return "\n".join(lines)


def run_workload(work: Workload, root: Path, args: argparse.Namespace, log: Callable[[str], None]) -> str:
    log(f"{work.name}: building {work.family} ...")
    key = hashlib.sha256(json.dumps(work.config, sort_keys=True).encode()).hexdigest()[:10]
    folder = with_larger_transformer(root / f"{work.family}-{key}", work.family, work.variant, work.config)
    spec = spec_class(work.family)(folder)
    autocast = args.precision == "bf16"
    with quiet():
        batch = make_batch(spec, work.frames, work.size, args.batch_size)
        base = lora_denoiser(spec, torch.bfloat16 if autocast else torch.float32, args.rank)
    total = len(spec.transformer_blocks(base))
    params = sum(p.numel() for n, p in base.named_parameters() if ".lora_" not in n)
    diffusers_switch = bool(getattr(base, "_supports_gradient_checkpointing", False))
    settings = make_settings(spec, base, diffusers_switch)
    del base
    steps = {s.label: step_fn(spec, s, batch, autocast) for s in settings}
    for setting in settings:
        steps[setting.label]()  # one step first: optimizer state, allocator, oneDNN kernels
        measure_memory(spec, setting, batch, autocast)
        log(f"  {setting.label}: saved {_mib(setting.saved)} MiB, peak {_mib(setting.peak)} MiB")
    time_rounds(settings, steps, args.rounds, log)
    switch = "diffusers' `enable_gradient_checkpointing`" if diffusers_switch else "dittune's block checkpointing"
    off = settings[0]
    contention = statistics.median(off.ms) * torch.get_num_threads() / statistics.median(off.cpu_ms)
    return (
        f"### {work.name}: {work.describe}\n\n{params / 1e6:.1f} M base parameters, LoRA rank {args.rank}, "
        f"batch {args.batch_size}; {total} transformer blocks; ratio 1 = {switch}. Wall × threads ÷ CPU time of "
        f"the step without checkpointing: {contention:.2f} (1.00: the cores were ours; well above 1: other "
        f"processes competed, and the CPU-time ratio is the more reliable one).\n\n{table(settings, total)}\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="alternating timing rounds (default 8)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: frozen weights + autocast")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--hidden", type=int, default=384, help="Hunyuan-DiT width, multiple of 64 (default 384)")
    parser.add_argument("--layers", type=int, default=8, help="Hunyuan-DiT blocks (default 8)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--video-heads", type=int, default=4, help="HunyuanVideo heads of 64 dims (default 4)")
    parser.add_argument("--video-layers", type=int, default=4, help="double- and single-stream blocks each (4)")
    parser.add_argument("--frames", type=int, default=17, help="frames per clip, 4k+1 (default 17)")
    parser.add_argument("--video-size", type=int, default=128, help="clip side in pixels (default 128)")
    parser.add_argument("--only", choices=("image", "video"), help="run one workload")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--workdir", type=Path, help="keep the built models here (default: a temp folder)")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/gradient_checkpointing-cpu.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/gradient_checkpointing.py", *(sys.argv[1:] if argv is None else argv)])
    started, load_before = time.perf_counter(), os.getloadavg()
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    root = args.workdir or Path(tempfile.mkdtemp(prefix="dittune-gc-bench-"))
    sections = [run_workload(w, root, args, log) for w in workloads(args) if args.only in (None, w.name)]
    capability = torch.backends.cpu.get_cpu_capability()
    report = [
        "# Gradient checkpointing by ratio (cpu)",
        "",
        f"- date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {machine_line(torch.device('cpu'))}; torch CPU capability **{capability}**",
        f"- command: `{command}`",
        f"- precision: {args.precision}; {args.rounds} alternating timing rounds of one step per setting after one "
        f"warm-up step; wall time {time.perf_counter() - started:.0f} s; load average {load_before[0]:.2f} → "
        f"{os.getloadavg()[0]:.2f}",
        "",
        "saved = bytes autograd keeps for backward after the forward (saved-tensor hooks + checkpoint inputs, each "
        "storage once, parameters excluded; deterministic). retained / peak = glibc allocator bytes above the "
        "step's start, read after every aten op: at the end of the forward / highest over forward + backward "
        "(recomputation included)"
        + ("" if LIVE is not None else " — not available here (no glibc mallinfo2)")
        + ". step = forward + loss + backward + AdamW + zero_grad, median of the rounds; ÷ off = ratio to no "
        "checkpointing in the same run. Rows without a step time are memory-only variants of ratio 0.5 (other "
        "blocks, same work).",
        "",
        *sections,
    ]
    text = "\n".join(report)
    print("\n" + text)
    if args.write:
        path = RESULTS_DIR / "gradient_checkpointing-cpu.md"
        write_results(path, text + "\n## Log\n\n```\n" + "\n".join(lines) + "\n```\n")
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
