"""`model.base_storage` for LoRA: bytes of the frozen denoiser per storage (exact) and step time ÷ the plain run.

One `build_run` + `Trainer` per storage from the same config, model folder and seed (Hunyuan-DiT with a larger
transformer, as in trainer_overhead.py); each step is one iteration of `Trainer.train` (`optimizer_step()` +
metrics line). Bytes are exact: the denoiser's parameters, buffers and bitsandbytes statistics without the
LoRA weights, and the bytes autograd keeps for the backward pass beyond the parameters during one step (the
activations, plus any upcast weight copies). A reference row applies diffusers' own `enable_layerwise_casting`
(fp8 e4m3) to the plain run's denoiser, to show what keeping upcast copies costs. Step times are taken in
alternating rounds inside one process, so machine noise hits every storage alike; the ratio of medians to the
plain ("default") run is the slowdown. Run `python benchmarks/base_storage.py --help`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shlex
import shutil
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
from trainer_overhead import (
    PRECISIONS,
    RESULTS_DIR,
    build_dataset,
    build_model,
    machine_line,
    make_config,
    ours_step,
    quiet,
    time_steps,
    write_results,
)

from dittune.models.checkpointing import SavedActivations

STORAGES = ("default", "fp8_e4m3", "fp8_e5m2", "nf4", "int8")
STOCK_FP8 = "diffusers fp8 hook"
"""The reference row: diffusers' `enable_layerwise_casting` on the plain run (not a dittune storage)."""


@dataclass
class Case:
    storage: str
    precision: str
    trainer: Any
    step: Callable[[], None]
    frozen_bytes: int = 0
    converted: str = ""
    held_bytes: int = 0
    ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.storage} {self.precision}"


def frozen_bytes(denoiser: torch.nn.Module) -> int:
    """Exact bytes of the frozen denoiser: everything but the LoRA weights."""
    from dittune.models.storage import tensor_bytes

    lora = sum(p.numel() * p.element_size() for n, p in denoiser.named_parameters() if ".lora_" in n)
    return tensor_bytes(denoiser) - lora


def held_for_backward(trainer: Any) -> int:
    """Bytes autograd saves for backward in one optimizer step, beyond the parameters and buffers (each storage
    once; `SavedActivations`)."""
    with SavedActivations(trainer.run.accelerator.unwrap_model(trainer.run.denoiser)) as saved:
        trainer.optimizer_step()
    return saved.bytes


def build_case(root: Path, model: Path, data: Path, storage: str, precision: str, args: Any) -> Case:
    from accelerate.state import AcceleratorState

    from dittune.cache.build import DTYPES
    from dittune.models.storage import applied_storage
    from dittune.train.runner import check
    from dittune.train.setup import build_run, make_accelerator
    from dittune.train.trainer import Trainer

    AcceleratorState._reset_state()
    cfg = make_config(root, model, data, "lora", precision, args.size, args.batch_size)
    name = "default" if storage == STOCK_FP8 else storage
    cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"base_storage": name}),
            "output_dir": cfg.output_dir.parent / f"lora-{precision}-{storage.replace(' ', '-')}",
        }
    )
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    check(cfg)
    cfg.output_dir.mkdir(parents=True)
    with quiet():
        run = build_run(cfg, make_accelerator(cfg), progress=False, announce=lambda _line: None)
    denoiser = run.accelerator.unwrap_model(run.denoiser)
    converted = ""
    if storage == STOCK_FP8:
        denoiser.enable_layerwise_casting(torch.float8_e4m3fn, DTYPES[run.weight_dtype])
        converted = "as diffusers chooses"
    else:
        report = applied_storage(denoiser)
        converted = f"{report.converted} converted, {report.kept} kept" if report and report.converted else "—"
    trainer = Trainer(run, progress=False)
    case = Case(storage, precision, trainer, ours_step(trainer), frozen_bytes(denoiser), converted)
    case.held_bytes = held_for_backward(trainer)
    return case


def measure(cases: list[Case], args: Any, device: torch.device, log: Callable[[str], None]) -> None:
    for case in cases:
        time_steps(case.step, args.warmup, device)
    for round_index in range(args.rounds):
        order = cases if round_index % 2 == 0 else cases[::-1]
        for case in order:
            wall, cpu = time_steps(case.step, args.steps, device)
            case.ms.append(wall)
            case.cpu_ms.append(cpu)
        log(f"  round {round_index + 1}/{args.rounds}: " + ", ".join(f"{c.storage} {c.ms[-1]:.0f}" for c in cases))


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f}"


def results_table(cases: list[Case]) -> str:
    lines = [
        "| storage | precision | frozen denoiser MiB | ÷ default | Linear layers | held for backward MiB "
        "| frozen + held MiB | ms/step | **step ÷ default** | per-round ratio [min–max] | CPU-time ratio |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        plain = next(c for c in cases if c.storage == "default" and c.precision == case.precision)
        rounds = [a / b for a, b in zip(case.ms, plain.ms)]
        lines.append(
            f"| {case.storage} | {case.precision} | {_mib(case.frozen_bytes)} "
            f"| {case.frozen_bytes / plain.frozen_bytes:.3f} | {case.converted} | {_mib(case.held_bytes)} "
            f"| {_mib(case.frozen_bytes + case.held_bytes)} | {statistics.median(case.ms):.1f} "
            f"| **{statistics.median(case.ms) / statistics.median(plain.ms):.3f}** "
            f"| {min(rounds):.3f}–{max(rounds):.3f} "
            f"| {statistics.median(case.cpu_ms) / statistics.median(plain.cpu_ms):.3f} |"
        )
    return "\n".join(lines)


def bytes_lines(cases: list[Case]) -> list[str]:
    return [f"- {c.name}: frozen denoiser {c.frozen_bytes:,} B, held for backward {c.held_bytes:,} B" for c in cases]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storages", default=",".join(STORAGES), help="comma list (default all)")
    parser.add_argument("--precisions", default="bf16,fp32", help="comma list of bf16, fp32 (default both)")
    parser.add_argument("--stock", action=argparse.BooleanOptionalAction, default=True, help="the diffusers row")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--hidden", type=int, default=384, help="transformer width, multiple of 64 (default 384)")
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks (default 8)")
    parser.add_argument("--images", type=int, default=8, help="images in the dataset (default 8)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per measurement block (default 1)")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds per precision (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each storage first (default 2)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--workdir", type=Path, help="keep model, data and caches here (default: a temp folder)")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/base_storage-<dev>.md")
    args = parser.parse_args(argv)
    args.storage_list = [s.strip() for s in args.storages.split(",") if s.strip()]
    args.precision_list = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if "default" not in args.storage_list:
        parser.error("--storages must include default (the reference)")
    for name in args.storage_list:
        if name not in STORAGES:
            parser.error(f"--storages: unknown storage {name!r}")
    for name in args.precision_list:
        if name not in PRECISIONS:
            parser.error(f"--precisions: unknown precision {name!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    command = shlex.join(["python", "benchmarks/base_storage.py", *(sys.argv[1:] if argv is None else argv)])

    def log(line: str) -> None:
        print(line, flush=True)

    cases: list[Case] = []
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dittune-bench-")))
        else:
            root = args.workdir.resolve()
            root.mkdir(parents=True, exist_ok=True)
        log(f"building model and data in {root} ...")
        model = build_model(
            root / f"model-h{args.hidden}-l{args.layers}-s{args.size}", args.hidden, args.layers, args.size
        )
        data = build_dataset(root / f"data-{args.size}-{args.images}", args.size, args.images)
        storages = [*args.storage_list, *([STOCK_FP8] if args.stock else [])]
        for precision in args.precision_list:
            log(f"{precision}: building {len(storages)} runs ...")
            group = [build_case(root, model, data, storage, precision, args) for storage in storages]
            measure(group, args, device, log)
            for case in group:
                case.trainer, case.step = None, _released
            cases += group
    total_s = time.perf_counter() - started
    table = results_table(cases)
    log("\n" + table)
    capability = torch.backends.cpu.get_cpu_capability()
    if args.write:
        from dittune.precision import cpu_bf16

        native = cpu_bf16()
        body = [
            f"# Base storage for LoRA ({device.type})",
            "",
            f"- date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"- machine: {machine_line(device)}",
            f"- torch CPU capability {capability}, native bf16: {native.native} ({native.detail})",
            f"- command: `{command}`",
            f"- setup: HunyuanDiT2DModel hidden {args.hidden}, {args.layers} blocks, heads of 64; "
            f"{args.size}×{args.size} images, batch {args.batch_size}; LoRA rank 16 on the attention projections "
            f"(fp32); {args.rounds} rounds × {args.steps} step(s) per storage after {args.warmup} warm-up steps",
            f"- wall time: {total_s:.0f} s; load average {os.getloadavg()[0]:.2f} at the end (2 cores: above 1, "
            "other processes compete with the timed thread; the CPU-time ratio is the steadier measure then)",
            "",
            "frozen denoiser = exact bytes of its parameters, buffers and bitsandbytes statistics, LoRA weights "
            "excluded; held for backward = bytes autograd keeps between forward and backward in one step beyond the "
            "parameters (activations and any upcast weight copies); step ÷ default = median step time ÷ that of "
            "the plain run in the same precision. See benchmarks/README.md.",
            "",
            table,
            "",
            "Exact bytes:",
            "",
            *bytes_lines(cases),
        ]
        path = RESULTS_DIR / f"base_storage-{device.type}.md"
        write_results(path, "\n".join(body) + "\n")
        log(f"wrote {path}")
    return 0


def _released() -> None:
    raise RuntimeError("this case's run was released")


if __name__ == "__main__":
    raise SystemExit(main())
