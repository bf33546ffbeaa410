"""`train.compile` on CPU: the real training step with the transformer blocks compiled ÷ the same step eager.

Two runs are built from the same config, model folder and seed (identical weights and batches); one gets
`dittune.models.compile.compile_blocks`. Each step is one iteration of `Trainer.train` (`optimizer_step()` +
metrics line, as in trainer_overhead.py). The compiled run's first step pays the compile with an empty
inductor cache (a temporary `TORCHINDUCTOR_CACHE_DIR`, as on a first run); then dynamo is reset and one more
step measures the compile with the on-disk cache filled (a later run with the same model and shapes). Steady
state is timed in alternating rounds inside one process, so machine noise hits both alike; the ratio of the
medians is the speed-up. Break-even: how many steps a run must last before the compile has paid for itself.
Run `python benchmarks/compile_cpu.py --help`.
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
    RESULTS_DIR,
    add_workload_args,
    build_dataset,
    build_model,
    check_workload_args,
    machine_line,
    make_config,
    quiet,
    time_steps,
    write_results,
)


@dataclass
class Case:
    """One configuration (method × precision): an eager and a compiled trainer and their timings."""

    method: str
    precision: str
    eager: Callable[[], float]
    compiled: Callable[[], float]
    blocks: int
    eager_first_s: float = 0.0
    cold_first_s: float = 0.0
    warm_first_s: float = 0.0
    first_loss_diff: float = 0.0
    eager_ms: list[float] = field(default_factory=list)
    compiled_ms: list[float] = field(default_factory=list)
    eager_cpu_ms: list[float] = field(default_factory=list)
    compiled_cpu_ms: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.method} {self.precision}"

    @property
    def ratio(self) -> float:
        """Compiled ÷ eager median step time (below 1: compiling pays per step)."""
        return statistics.median(self.compiled_ms) / statistics.median(self.eager_ms)

    def break_even(self, first_s: float) -> str:
        """Steps after which the compiled run has caught up with the eager one, given its first step."""
        eager, compiled = statistics.median(self.eager_ms) / 1000, statistics.median(self.compiled_ms) / 1000
        if compiled >= eager:
            return "never"
        return f"{1 + (first_s - self.eager_first_s) / (eager - compiled):,.0f}"


def trainer_step(trainer: Any) -> Callable[[], float]:
    """One iteration of `Trainer.train`'s loop (progress bar and side tasks off); returns the loss."""

    def step() -> float:
        started = time.perf_counter()
        loss, logs, samples = trainer.optimizer_step()
        trainer.step += 1
        trainer.log_step(loss, logs, samples, started)
        return float(loss)

    return step


def build_trainer(root: Path, model: Path, data: Path, method: str, precision: str, args: Any) -> Any:
    from dittune.train.runner import check
    from dittune.train.setup import build_run, make_accelerator
    from dittune.train.trainer import Trainer

    cfg = make_config(root, model, data, method, precision, args.size, args.batch_size)
    cfg.train.gradient_checkpointing = args.gradient_checkpointing
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    check(cfg)
    cfg.output_dir.mkdir(parents=True)
    with quiet():
        run = build_run(cfg, make_accelerator(cfg), progress=False, announce=lambda _line: None)
    return Trainer(run, progress=False)


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    started = time.perf_counter()
    loss = fn()
    return time.perf_counter() - started, loss


def build_case(root: Path, model: Path, data: Path, method: str, precision: str, args: Any) -> Case:
    """Both trainers, the first steps (eager, compiled with a cold and a warm cache) and the warm-up."""
    import torch._dynamo

    from dittune.models.compile import compile_blocks

    torch._dynamo.reset()  # no compiled variants of an earlier case
    eager_trainer = build_trainer(root / "eager", model, data, method, precision, args)
    compiled_trainer = build_trainer(root / "compiled", model, data, method, precision, args)
    run = compiled_trainer.run
    blocks = compile_blocks(run.spec, run.accelerator.unwrap_model(run.denoiser), **args.compile_options)
    case = Case(method, precision, trainer_step(eager_trainer), trainer_step(compiled_trainer), blocks)
    case.eager_first_s, eager_loss = timed(case.eager)
    case.cold_first_s, compiled_loss = timed(case.compiled)
    case.first_loss_diff = abs(eager_loss - compiled_loss)
    torch._dynamo.reset()  # forget the compiled code; the next step compiles again from the filled disk cache
    case.warm_first_s, _ = timed(case.compiled)
    case.eager()  # keep both runs at the same step
    for _ in range(args.warmup):
        case.eager()
        case.compiled()
    return case


def measure(case: Case, args: Any, device: torch.device, log: Callable[[str], None]) -> None:
    def run_eager() -> None:
        case.eager()

    def run_compiled() -> None:
        case.compiled()

    for index in range(args.rounds):
        for which in ("eager", "compiled") if index % 2 == 0 else ("compiled", "eager"):
            wall, cpu = time_steps(run_eager if which == "eager" else run_compiled, args.steps, device)
            (case.eager_ms if which == "eager" else case.compiled_ms).append(wall)
            (case.eager_cpu_ms if which == "eager" else case.compiled_cpu_ms).append(cpu)
        log(
            f"  round {index + 1}/{args.rounds} {case.name:<10} eager {case.eager_ms[-1]:8.1f} ms  "
            f"compiled {case.compiled_ms[-1]:8.1f} ms  ratio {case.compiled_ms[-1] / case.eager_ms[-1]:.3f}"
        )


def results_table(cases: list[Case]) -> str:
    lines = [
        "| config | eager ms/step | compiled ms/step | **compiled ÷ eager** | per-round ratio median [min–max] "
        "| CPU-time ratio | first step eager s | first compiled step s, cold / warm cache "
        "| break-even steps, cold / warm cache |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        rounds = [c / e for c, e in zip(case.compiled_ms, case.eager_ms)]
        cpu = statistics.median(case.compiled_cpu_ms) / statistics.median(case.eager_cpu_ms)
        lines.append(
            f"| {case.name} | {statistics.median(case.eager_ms):.1f} | {statistics.median(case.compiled_ms):.1f} "
            f"| **{case.ratio:.3f}** | {statistics.median(rounds):.3f} [{min(rounds):.3f}–{max(rounds):.3f}] "
            f"| {cpu:.3f} | {case.eager_first_s:.1f} | {case.cold_first_s:.1f} / {case.warm_first_s:.1f} "
            f"| {case.break_even(case.cold_first_s)} / {case.break_even(case.warm_first_s)} |"
        )
    return "\n".join(lines)


def cpu_line() -> str:
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    native = [name for name in ("avx512_bf16", "amx_bf16") if name in flags]
    return (
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
        f"{', '.join(native) or 'no'}; inductor compile threads {_compile_threads()}"
    )


def _compile_threads() -> int:
    import torch._inductor.config

    return int(torch._inductor.config.compile_threads)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per measurement block (default 1)")
    parser.add_argument("--rounds", type=int, default=12, help="alternating eager/compiled rounds (default 12)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each run after the first (default 2)")
    add_workload_args(parser)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="train.gradient_checkpointing on")
    parser.add_argument("--mode", help="torch.compile mode (default: torch's default)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--warm-cache", action="store_true", help="keep the user's inductor cache (default: empty)")
    parser.add_argument("--workdir", type=Path, help="keep model, data and caches here (default: a temp folder)")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/compile-cpu.md")
    args = parser.parse_args(argv)
    check_workload_args(parser, args)
    args.compile_options = {"mode": args.mode} if args.mode else {}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    command = shlex.join(["python", "benchmarks/compile_cpu.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()

    def log(line: str) -> None:
        print(line, flush=True)

    cases: list[Case] = []
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dittune-compile-")))
        else:
            root = args.workdir.resolve()
            root.mkdir(parents=True, exist_ok=True)
        if not args.warm_cache:  # must be set before inductor reads it (first compile)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="dittune-inductor-")
            )
        log(f"building model and data in {root} ...")
        model = build_model(
            root / f"model-h{args.hidden}-l{args.layers}-s{args.size}", args.hidden, args.layers, args.size
        )
        data = build_dataset(root / f"data-{args.size}-{args.images}", args.size, args.images)
        for precision in args.precision_list:
            for method in args.method_list:
                log(f"{method} {precision}: building both runs, compiling (first step) ...")
                case = build_case(root, model, data, method, precision, args)
                log(
                    f"  first step eager {case.eager_first_s:.1f} s, compiled {case.cold_first_s:.1f} s (cold cache), "
                    f"{case.warm_first_s:.1f} s (warm cache); |loss difference| {case.first_loss_diff:.2e}"
                )
                measure(case, args, device, log)
                case.eager = case.compiled = _released
                cases.append(case)
        total_s = time.perf_counter() - started

    summary = results_table(cases)
    log("")
    log(summary)
    log(f"\nbenchmark wall time {total_s:.0f} s; {cpu_line()}")
    if args.write:
        path = RESULTS_DIR / "compile-cpu.md"
        setup = (
            f"HunyuanDiT2DModel hidden {args.hidden}, {args.layers} blocks, heads of 64; {args.size}×{args.size} "
            f"images → {(args.size // 16) ** 2} image tokens + 77/256 text tokens; batch {args.batch_size}; "
            f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; torch.compile options "
            f"{args.compile_options or 'default'}; {args.rounds} rounds × {args.steps} steps per run and config "
            f"after the first steps and {args.warmup} warm-up steps"
        )
        body = [
            "# train.compile on CPU",
            "",
            f"- date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"- machine: {machine_line(device)}",
            f"- {cpu_line()}",
            f"- command: `{command}`",
            f"- setup: {setup}",
            f"- wall time: {total_s:.0f} s",
            "- |first-step loss difference| eager vs compiled: "
            + ", ".join(f"{c.name} {c.first_loss_diff:.1e}" for c in cases),
            "",
            "compiled ÷ eager = median step time of the compiled run ÷ that of the eager run (below 1: faster). "
            "First compiled step: with an empty inductor cache (cold) and again after `torch._dynamo.reset()` with "
            "the cache filled (warm). Break-even: steps after which the compiled run has caught up, counting "
            "from the first step. See benchmarks/README.md.",
            "",
            summary,
        ]
        write_results(path, "\n".join(body) + "\n")
        log(f"wrote {path}")
    return 0


def _released() -> float:
    raise RuntimeError("this case's run was released")


if __name__ == "__main__":
    sys.exit(main())
