"""The quickstart end to end: wall time per phase and peak memory.

    python benchmarks/quickstart.py [--out DIR] [--write]

Runs `bash scripts/quickstart.sh OUT` as a child process (the environment already exists, so its
creation is not timed), reads the phase markers it prints, and reports:

- wall time of the whole command and of each phase (from its `==>` lines to the next);
- the largest peak resident memory of any process it ran (`ru_maxrss` of the children: the training
  process dominates), and the peak the trainer itself logged in metrics.jsonl;
- the summary the quickstart measured (hollow rate and colour accuracy, base → LoRA).

With `--write`, the report goes to `benchmarks/results/quickstart-cpu-<fp32|bf16>.md`, by the precision
`mixed_precision = "auto"` chose on this CPU. To measure a CPU without native bf16 on one that has it,
limit torch and oneDNN to AVX2 for the run (bf16 matmuls then take the slow path, and "auto" sees it):

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/quickstart.py --write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(out: Path) -> dict:
    command = ["bash", str(REPO / "scripts" / "quickstart.sh"), str(out)]
    phases: list[tuple[str, float]] = []
    precision = "?"
    started = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
        assert child.stdout is not None
        for line in child.stdout:
            sys.stdout.write(line)
            if line.startswith("==> "):
                phases.append((line[4:].strip(), time.perf_counter() - started))
            if line.startswith("Precision  "):
                precision = line.removeprefix("Precision  ").strip()
        code = child.wait()
    total = time.perf_counter() - started
    if code:
        raise SystemExit(f"quickstart failed with exit code {code}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    bounds = [t for _, t in phases] + [total]
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line]
    return {
        "command": shlex.join(command),
        "precision": precision,
        "total_s": total,
        "phases": [(name, bounds[i + 1] - bounds[i]) for i, (name, _) in enumerate(phases)],
        "peak_rss_mib": peak_kib / 1024 if sys.platform != "darwin" else peak_kib / 2**20,
        "trainer_peak_mib": max(m.get("peak_memory_mb", 0.0) for m in metrics),
        "train_step_ms": 1000 * sorted(m["step_time"] for m in metrics)[len(metrics) // 2],
        "summary": json.loads((out / "summary.json").read_text()),
    }


def machine_line() -> str:
    """CPU, torch's kernel level, native bf16, and any environment override that limits them."""
    import torch

    from dittune.precision import cpu_bf16

    cpu = cpu_bf16()
    limits = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
    overrides = " ".join(f"{k}={os.environ[k]}" for k in limits if k in os.environ)
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} capability "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {'yes' if cpu.native else 'no'} ({cpu.detail})"
        + (f"; environment {overrides}" if overrides else "")
    )


def report(result: dict) -> str:
    base, lora = result["summary"]["base"], result["summary"]["lora"]
    lines = [
        "# Quickstart, end to end (CPU)",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine_line()}, Python {platform.python_version()}",
        f"- precision: {result['precision']}",
        f"- command: `{result['command']}` (environment already present)",
        "",
        f"**Total: {result['total_s']:.0f} s; peak memory {result['peak_rss_mib']:.0f} MiB** "
        f"(largest child process RSS; the trainer logged {result['trainer_peak_mib']:.0f} MiB).",
        "",
        "| phase | seconds |",
        "| --- | ---: |",
        *[f"| {name} | {seconds:.1f} |" for name, seconds in result["phases"]],
        "",
        f"Median training step: {result['train_step_ms']:.0f} ms (LoRA, batch 8, {result['precision'].split()[0]}).",
        "",
        "| held-out ring prompts | base | base + LoRA |",
        "| --- | ---: | ---: |",
        f"| hollow shapes | {base['hollow_rate']:.0%} | {lora['hollow_rate']:.0%} |",
        f"| colour accuracy | {base['colour_accuracy']:.0%} | {lora['colour_accuracy']:.0%} |",
        f"| images | {base['samples']} | {lora['samples']} |",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="quickstart output folder (default: a temporary one)")
    parser.add_argument(
        "--write", action="store_true", help="write benchmarks/results/quickstart-cpu-<fp32|bf16>.md (the precision)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run((args.out or Path(tmp) / "quickstart").resolve())
    text = report(result)
    print("\n" + text)
    if args.write:
        name = result["precision"].split()[0]
        (REPO / "benchmarks" / "results" / f"quickstart-cpu-{name}.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
