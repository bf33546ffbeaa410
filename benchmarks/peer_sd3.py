"""dittune against diffusers' `train_dreambooth_lora_sd3.py` on the same work, as whole processes.

Both train the same ~30 M-parameter SD3 (built offline) at 256 px, batch 2, LoRA rank 4 on the same attention
projections, T5 length 256, fp32, AdamW at the same learning rate and weight decay, latents cached, no
validation, checkpoints or trackers. Each run is one child process (`python -m dittune train CONFIG` or
`python PEER_SCRIPT ...`) with a fixed thread count; runs of 10 and 40 steps alternate between the two tools.
Reported as dittune ÷ peer: the steady step time (wall(40) − wall(10)) / 30, the wall time of a 40-step run
and the peak resident memory (ru_maxrss of the child). Also: dittune's step ÷ the bare model step on the same
batch (in this process, alternating), and where a dittune run's wall time goes (phases, imports per phase).

The peer script is not part of this repository: pass its path (`--peer-script`). torchvision, which it imports,
is replaced by `benchmarks/shims/torchvision`, served by `benchmarks/shims/run_peer.py` to the script's own
imports. Run `python benchmarks/peer_sd3.py --help`; README.md (section `peer_sd3.py`) says how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"
SHIMS = HERE / "shims"
PROMPT = "a photo of sks circle on a white background"
LORA_TARGETS = (
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
)  # fmt: skip
"""The peer's default `target_modules` (no `--lora_layers`); dittune's `lora.targets` is set to the same list."""
COLOURS = ((220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 230, 20), (200, 30, 200), (30, 200, 200))
PRECISIONS = {"fp32": "no", "bf16": "bf16"}
"""Benchmark precision → `train.mixed_precision` (dittune) and `--mixed_precision` (peer)."""
TARGETS = {"steady": 1.00, "wall": 0.70, "rss": 0.80, "bare": 1.03}
PROGRESS = re.compile(r"(?:Steps|Training):\s*\d+%.*?\|\s*(\d+)/(\d+)\s*\[")
PHASE_MARK = "@@phase"
BUILD_RUN = "model load, LoRA, optimizer (build_run without the cache check)"


# ------------------------------------------------------------------------------------------ fixtures
def transformer_config(hidden: int, layers: int, size: int) -> dict[str, Any]:
    """An SD3-style (no QK norm) `SD3Transformer2DModel`, 64-dim heads; text widths match the tiny encoders."""
    from dittune.models.sd3.tiny import CLIP_G_HIDDEN, CLIP_L_HIDDEN, T5_HIDDEN

    if hidden % 64:
        raise SystemExit(f"--hidden {hidden} must be a multiple of 64 (heads of 64 dims)")
    return {
        "sample_size": size // 8,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": layers,
        "attention_head_dim": 64,
        "num_attention_heads": hidden // 64,
        "joint_attention_dim": T5_HIDDEN,
        "caption_projection_dim": hidden,
        "pooled_projection_dim": CLIP_L_HIDDEN + CLIP_G_HIDDEN,
        "out_channels": 16,
        "pos_embed_max_size": max(64, size // 16),
        "qk_norm": None,
        "dual_attention_layers": (),
    }


def build_model(folder: Path, hidden: int, layers: int, size: int) -> Path:
    """The tiny SD3 pipeline (tokenizers, encoders, VAE, scheduler) with a larger transformer; reused if present."""
    from trainer_overhead import with_larger_transformer

    return with_larger_transformer(folder, "sd3", "sd3", transformer_config(hidden, layers, size))


def build_datasets(root: Path, size: int, count: int) -> tuple[Path, Path]:
    """The same `count` square images twice: bare (peer: every file must be an image) and with captions (dittune).

    Every caption is the peer's instance prompt, so both train on identical (image, text) pairs.
    """
    from PIL import Image, ImageDraw

    images, captioned = root / f"images-{size}-{count}", root / f"captioned-{size}-{count}"
    for folder in (images, captioned):
        folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        name = f"img_{index:03d}.png"
        if not (images / name).is_file():
            image = Image.new("RGB", (size, size), (255, 255, 255))
            inset = size // 8 + (index * size // 64) % (size // 4)
            ImageDraw.Draw(image).ellipse([inset, inset, size - inset, size - inset], COLOURS[index % len(COLOURS)])
            image.save(images / name)
        if not (captioned / name).is_file():
            shutil.copyfile(images / name, captioned / name)
        (captioned / f"img_{index:03d}.txt").write_text(PROMPT, encoding="utf-8")
    return images, captioned


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def dittune_config(path: Path, output_dir: Path, model: Path, data: Path, cache: Path, steps: int, args: Any) -> Path:
    """A dittune config matching the peer's command line (see `peer_command`); written to `path`."""
    sections: dict[str, dict[str, Any]] = {
        "model": {"family": "sd3", "path": model, "t5_max_length": args.t5_length, "weight_dtype": "auto"},
        "data": {
            "path": data,
            "resolution": args.size,
            "resolution_type": "pixel",
            "crop": "center",
            "random_flip": False,
        },
        "train": {
            "method": "lora",
            "max_steps": steps,
            "batch_size": args.batch_size,
            "seed": 0,
            "learning_rate": args.lr,
            "lr_scheduler": "constant",
            "lr_warmup_steps": 0,
            "optimizer": "adamw",
            "weight_decay": 1e-4,
            "max_grad_norm": 1.0,
            "mixed_precision": PRECISIONS[args.precision],
            "trackers": [],
            "log_every_steps": 1,
        },
        "lora": {"rank": args.rank, "alpha": float(args.rank), "targets": list(LORA_TARGETS)},
        "loss": {"timestep_sampling": "logit_normal", "weighting": "none"},
        "cache": {"dir": cache},
        "checkpoint": {"every_steps": 1_000_000, "keep_last": 1},
    }
    lines = [f"output_dir = {toml_value(output_dir)}"]
    for name, values in sections.items():
        lines += ["", f"[{name}]", *(f"{key} = {toml_value(value)}" for key, value in values.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def peer_command(script: Path, output_dir: Path, model: Path, images: Path, steps: int, args: Any) -> list[str]:
    """The peer's command line: the same work as `dittune_config`, its validation, hub and trackers off."""
    return [
        sys.executable,
        str(SHIMS / "run_peer.py"),
        str(script),
        f"--pretrained_model_name_or_path={model}",
        f"--instance_data_dir={images}",
        f"--instance_prompt={PROMPT}",
        f"--output_dir={output_dir}",
        f"--resolution={args.size}",
        "--center_crop",
        f"--train_batch_size={args.batch_size}",
        f"--rank={args.rank}",
        f"--max_sequence_length={args.t5_length}",
        "--cache_latents",
        f"--mixed_precision={PRECISIONS[args.precision]}",
        f"--max_train_steps={steps}",
        "--checkpointing_steps=1000000",
        f"--learning_rate={args.lr}",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        "--optimizer=AdamW",
        "--adam_weight_decay=1e-4",
        "--max_grad_norm=1.0",
        "--weighting_scheme=logit_normal",
        "--seed=0",
        "--dataloader_num_workers=0",
        # accelerate insists on a tracker name; one that is not installed makes it start none
        "--report_to=dvclive",
    ]


# ------------------------------------------------------------------------------------------ child processes
@dataclass
class RunResult:
    """One child process: wall and CPU seconds, peak RSS, progress-bar timestamps (seconds after launch)."""

    tool: str
    steps: int
    wall_s: float
    cpu_s: float
    maxrss_mb: float
    progress: dict[int, float] = field(default_factory=dict)
    log: Path | None = None

    def contention(self, threads: int) -> float:
        """wall × threads ÷ CPU time: 1.0 when the child had its cores to itself (and kept them busy)."""
        return self.wall_s * threads / self.cpu_s if self.cpu_s else float("nan")

    def first_step_s(self) -> float:
        """Launch → first optimizer step done (start-up plus one step)."""
        return self.progress.get(1, float("nan"))

    def step_times(self) -> list[float]:
        """Per-step seconds from the progress bar, without the first two steps (warm-up)."""
        marks = sorted(self.progress.items())
        return [b - a for (i, a), (j, b) in itertools.pairwise(marks) if i >= 2 and j == i + 1]


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        WANDB_MODE="disabled",
    )
    env.pop("PYTHONPATH", None)
    return env


def run_child(tool: str, steps: int, command: list[str], env: dict[str, str], log: Path) -> RunResult:
    """Run `command`, stream its output into `log`, timestamp progress-bar updates, reap it with wait4."""
    log.parent.mkdir(parents=True, exist_ok=True)
    progress: dict[int, float] = {}
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None

    def read(stream: Any, sink: Any) -> None:
        pending = b""
        while chunk := stream.read1(65536):
            now = time.perf_counter() - started
            sink.write(chunk)
            pending += chunk
            *parts, pending = re.split(rb"[\r\n]", pending)
            for part in parts:
                match = PROGRESS.search(part.decode("utf-8", "replace"))
                if match:
                    progress.setdefault(int(match.group(1)), now)

    with open(log, "wb") as sink:
        reader = threading.Thread(target=read, args=(proc.stdout, sink), daemon=True)
        reader.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        reader.join()
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{tool} ({steps} steps) exited with {proc.returncode}; log {log}:\n{tail}")
    progress.pop(0, None)
    return RunResult(tool, steps, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, progress, log)


@dataclass
class Setup:
    """Everything the runs share."""

    args: Any
    root: Path
    model: Path
    images: Path
    captioned: Path
    cache: Path
    threads: int

    def command(self, tool: str, steps: int, tag: str) -> tuple[list[str], dict[str, str], Path]:
        out = self.root / "runs" / f"{tool}-{steps}-{tag}"
        shutil.rmtree(out, ignore_errors=True)
        if tool == "dittune":
            config = dittune_config(self.root / "configs" / f"{steps}.toml", out, self.model, self.captioned,
                                    self.cache, steps, self.args)  # fmt: skip
            return [sys.executable, "-m", "dittune", "train", str(config)], child_env(self.threads), out
        command = peer_command(self.args.peer_script, out, self.model, self.images, steps, self.args)
        return command, child_env(self.threads), out

    def run(self, tool: str, steps: int, tag: str) -> RunResult:
        command, env, _out = self.command(tool, steps, tag)
        return run_child(tool, steps, command, env, self.root / "logs" / f"{tool}-{steps}-{tag}.log")


# ------------------------------------------------------------------------------------------ phase breakdown
def breakdown_child(config: str) -> int:
    """Run `dittune train CONFIG` with phase markers on stderr (for `-X importtime` attribution) and a JSON summary.

    Runs inside a child started as `python -X importtime benchmarks/peer_sd3.py --breakdown-child CONFIG`.
    Each wrapped call prints `@@phase NAME begin|end EPOCH`; import-time lines in between belong to that phase.
    """
    mark_stack: list[str] = []

    def mark(name: str, edge: str) -> None:
        rss, hwm = memory_kb()
        print(f"\n{PHASE_MARK} {name} {edge} {time.time():.6f} {rss} {hwm}", file=sys.stderr, flush=True)

    def wrap(owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def wrapper(*a: Any, **k: Any) -> Any:
            mark_stack.append(name)
            mark(name, "begin")
            try:
                return original(*a, **k)
            finally:
                mark(name, "end")
                mark_stack.pop()

        setattr(owner, attr, wrapper)

    mark("cli-imports", "begin")
    from dittune.cli import main as cli_main

    mark("cli-imports", "end")
    mark("train-imports", "begin")
    from dittune.train import runner, setup, summary, trainer

    mark("train-imports", "end")
    wrap(cli_main, "_load", "config load")
    wrap(runner, "check", "preflight check")
    wrap(setup, "make_accelerator", "accelerator")
    wrap(setup, "fill_caches", "cache check")
    wrap(setup, "build_run", BUILD_RUN)
    wrap(summary, "startup_summary", "startup summary")
    wrap(trainer.Trainer, "optimizer_step", "steps")
    wrap(trainer.Trainer, "log_step", "steps (metrics line)")
    wrap(trainer.Trainer, "checkpoint", "final checkpoint")
    wrap(trainer.Trainer, "plot_loss", "loss plot")
    wrap(trainer.Trainer, "export", "export LoRA")
    code = cli_main.main(["train", config])
    mark("exit", "begin")
    return int(code)


@dataclass
class Phase:
    name: str
    wall_s: float = 0.0
    imports_s: float = 0.0
    calls: int = 0
    rss_mb: float = 0.0
    """Resident memory at the (last) end of the phase."""
    hwm_mb: float = 0.0
    """Peak resident memory of the process so far, at the (last) end of the phase."""


def memory_kb() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB, from /proc (0, 0 where there is none)."""
    values = {"VmRSS:": 0, "VmHWM:": 0}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, *rest = line.split()
            if key in values and rest:
                values[key] = int(rest[0])
    return values["VmRSS:"], values["VmHWM:"]


def parse_breakdown(log: Path, launched: float, ended: float) -> list[Phase]:
    """Phases from the markers (time.time()), in order of first start, each with its `-X importtime` imports.

    Wall times are inclusive; an import belongs to the innermost phase running. The cache check runs inside
    `build_run`, so the `build_run` row is reduced to the rest of it (model load, LoRA, optimizer).
    """
    first = Phase("interpreter start + benchmark wrapper imports")
    phases: dict[str, Phase] = {first.name: first}
    stack: list[tuple[str, float]] = []
    first_mark: float | None = None
    exit_at = ended
    for raw in log.read_text(errors="replace").splitlines():
        for tag in (PHASE_MARK, "import time:"):  # a progress bar's last update may precede it on the line
            if tag in raw:
                raw = raw[raw.index(tag) :]
        line = raw.strip("\r")
        if line.startswith(PHASE_MARK):
            name, edge, stamp, rss, hwm = line[len(PHASE_MARK) + 1 :].rsplit(" ", 4)
            at = float(stamp)
            first_mark = at if first_mark is None else first_mark
            if name == "exit":
                exit_at = at
                stack.clear()
            elif edge == "begin":
                phases.setdefault(name, Phase(name))
                stack.append((name, at))
            else:
                top, begun = stack.pop()
                phases[top].wall_s += at - begun
                phases[top].calls += 1
                phases[top].rss_mb, phases[top].hwm_mb = int(rss) / 1024, int(hwm) / 1024
        elif line.startswith("import time:") and "|" in line:
            cells = line.split("|")
            if len(cells[2]) - len(cells[2].lstrip()) > 1 or not cells[1].strip().isdigit():
                continue  # nested (counted in its parent) or the header
            owner = stack[-1][0] if stack else first.name if first_mark is None else "(between phases)"
            phases.setdefault(owner, Phase(owner)).imports_s += int(cells[1]) / 1e6
    first.wall_s = (first_mark or launched) - launched
    build, cache = phases.get(BUILD_RUN), phases.get("cache check")
    if build is not None and cache is not None:
        build.wall_s -= cache.wall_s
    between = phases.setdefault("(between phases)", Phase("(between phases)"))
    between.wall_s = max(0.0, (exit_at - launched) - sum(p.wall_s for p in phases.values()))
    phases["exit"] = Phase("exit (end_training, interpreter shutdown)", ended - exit_at)
    return list(phases.values())


def run_breakdown(setup: Setup, steps: int) -> tuple[RunResult, list[Phase]]:
    command, env, _ = setup.command("dittune", steps, "breakdown")
    config = command[-1]
    command = [sys.executable, "-X", "importtime", str(Path(__file__).resolve()), "--breakdown-child", config]
    launched = time.time()
    result = run_child("dittune", steps, command, env, setup.root / "logs" / f"dittune-{steps}-breakdown.log")
    ended = launched + result.wall_s
    assert result.log is not None
    return result, parse_breakdown(result.log, launched, ended)


# ------------------------------------------------------------------------------------------ bare step
@dataclass
class BareResult:
    ours_ms: list[float] = field(default_factory=list)
    bare_ms: list[float] = field(default_factory=list)
    ours_cpu_ms: list[float] = field(default_factory=list)
    bare_cpu_ms: list[float] = field(default_factory=list)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def measure_bare(setup: Setup, rounds: int, warmup: int) -> BareResult:
    """dittune's step (`optimizer_step` + metrics line) vs forward → MSE → backward → AdamW on one fixed batch."""
    import torch
    from accelerate.state import AcceleratorState

    from dittune.config.load import load_config
    from dittune.train.runner import check
    from dittune.train.setup import build_run, make_accelerator
    from dittune.train.trainer import Trainer

    torch.set_num_threads(setup.threads)
    _, _, out = setup.command("dittune", 1_000_000, "bare")
    config = dittune_config(setup.root / "configs" / "bare.toml", out, setup.model, setup.captioned, setup.cache,
                            1_000_000, setup.args)  # fmt: skip
    cfg = load_config(config, [])
    check(cfg)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    AcceleratorState._reset_state()
    with quiet():
        run = build_run(cfg, make_accelerator(cfg), progress=False, announce=lambda _line: None)
    trainer = Trainer(run, progress=False)

    def ours() -> None:
        started = time.perf_counter()
        loss, logs, samples = trainer.optimizer_step()
        trainer.step += 1
        trainer.log_step(loss, logs, samples, started)

    _, items = run.sampler.next_batch()
    generator = torch.Generator().manual_seed(1234)
    batch = trainer.batches.collate(items, generator)
    x0 = run.spec.latents_from_moments(batch.moments, generator, False)
    sigmas = torch.rand(x0.shape[0], generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise
    target = torch.randn(x0.shape, generator=generator).to(x0.device)
    prompt_embeds, pooled = run.spec.joint_text(batch.text)
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)
    model = run.denoiser

    def bare() -> None:
        with run.accelerator.autocast():
            out = model(
                hidden_states=x_t,
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled,
                timestep=sigmas * 1000.0,
                return_dict=False,
            )[0]
        torch.nn.functional.mse_loss(out.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(fn: Callable[[], None]) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000

    result = BareResult()
    for _ in range(warmup):
        ours()
        bare()
    for index in range(rounds):
        for which in ("ours", "bare") if index % 2 == 0 else ("bare", "ours"):
            wall, cpu = timed(ours if which == "ours" else bare)
            (result.ours_ms if which == "ours" else result.bare_ms).append(wall)
            (result.ours_cpu_ms if which == "ours" else result.bare_cpu_ms).append(cpu)
    return result


# ------------------------------------------------------------------------------------------ reporting
def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


Row = tuple[str, str, float, float, float | None]
"""(label, unit, dittune, peer, target for dittune ÷ peer or None) of the main table."""


def summarise(runs: list[RunResult], short: int, long: int) -> dict[str, dict[str, float]]:
    """Per tool: median walls and CPU times, steady step, peak RSS and start-up of its timed runs."""
    out: dict[str, dict[str, float]] = {}
    for tool in ("dittune", "peer"):
        mine = [r for r in runs if r.tool == tool]
        walls = {n: med([r.wall_s for r in mine if r.steps == n]) for n in (short, long)}
        cpus = {n: med([r.cpu_s for r in mine if r.steps == n]) for n in (short, long)}
        out[tool] = {
            "wall_short": walls[short],
            "wall_long": walls[long],
            "steady": (walls[long] - walls[short]) / (long - short),
            "cpu_long": cpus[long],
            "steady_cpu": (cpus[long] - cpus[short]) / (long - short),
            "progress_step": med([t for r in mine if r.steps == long for t in r.step_times()]),
            "first_step": med([r.first_step_s() for r in mine]),
            "rss": max(r.maxrss_mb for r in mine),
            "rss_median": med([r.maxrss_mb for r in mine]),
        }
    return out


def ratio_rows(summary: dict[str, dict[str, float]], short: int, long: int) -> list[Row]:
    """The main table: the three measures with targets first, then what explains them."""
    n = long - short
    labels = {
        "steady": (f"**steady step**: (wall({long}) − wall({short})) / {n}", "s", TARGETS["steady"]),
        "wall_long": (f"**wall time of a {long}-step run** (median)", "s", TARGETS["wall"]),
        "rss": ("**peak RSS** (largest ru_maxrss of the child, all runs)", "MiB", TARGETS["rss"]),
        "steady_cpu": (f"steady step from CPU time: (CPU({long}) − CPU({short})) / {n}", "s", None),
        "cpu_long": (f"CPU time of a {long}-step run (median)", "s", None),
        "wall_short": (f"wall time of a {short}-step run (median)", "s", None),
        "progress_step": ("step time from the progress bar (median, steps ≥ 3)", "s", None),
        "first_step": ("launch → first step done (median)", "s", None),
        "rss_median": ("peak RSS (median over runs)", "MiB", None),
    }
    return [(label, unit, summary["dittune"][key], summary["peer"][key], target)
            for key, (label, unit, target) in labels.items()]  # fmt: skip


def main_table(rows: list[Row]) -> str:
    lines = ["| measure | dittune | peer | **dittune ÷ peer** | target | met |", "|---|---:|---:|---:|:---:|:---:|"]
    for label, unit, ours, peer, target in rows:
        value = ours / peer if peer else float("nan")
        goal, met = ("", "") if target is None else (f"≤ {target:.2f}", "yes" if value <= target else "NO")
        fmt = ".0f" if unit == "MiB" else ".2f"
        lines.append(f"| {label} | {ours:{fmt}} {unit} | {peer:{fmt}} {unit} | **{value:.3f}** | {goal} | {met} |")
    return "\n".join(lines)


def runs_table(runs: list[RunResult], threads: int) -> str:
    lines = [
        "| # | tool | steps | wall s | CPU s | wall × threads ÷ CPU | peak RSS MiB | first step done s "
        "| step s (bar) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for index, run in enumerate(runs, 1):
        lines.append(
            f"| {index} | {run.tool} | {run.steps} | {run.wall_s:.2f} | {run.cpu_s:.2f} "
            f"| {run.contention(threads):.2f} | {run.maxrss_mb:.0f} | {run.first_step_s():.2f} "
            f"| {med(run.step_times()):.3f} |"
        )
    return "\n".join(lines)


def bare_table(bare: BareResult, steady_s: float, short: int, long: int) -> str:
    ours, base = med(bare.ours_ms), med(bare.bare_ms)
    rounds = [o / b for o, b in zip(bare.ours_ms, bare.bare_ms)]
    cpu = med(bare.ours_cpu_ms) / med(bare.bare_cpu_ms)
    target = TARGETS["bare"]
    return "\n".join(
        [
            "| measure | ms/step | ÷ bare | target | met |",
            "|---|---:|---:|:---:|:---:|",
            f"| bare model step (in-process) | {base:.1f} | 1.000 | | |",
            f"| dittune step, in-process alternating with bare (median; per-round median "
            f"{med(rounds):.3f} [{min(rounds):.3f}–{max(rounds):.3f}], CPU-time ratio {cpu:.3f}) | {ours:.1f} "
            f"| **{ours / base:.3f}** | ≤ {target:.2f} | {'yes' if ours / base <= target else 'NO'} |",
            f"| dittune steady step of the processes, (wall({long}) − wall({short})) / {long - short} "
            f"| {steady_s * 1000:.1f} "
            f"| {steady_s * 1000 / base:.3f} | | |",
        ]
    )


def breakdown_table(phases: list[Phase], result: RunResult) -> str:
    lines = [
        "| phase | wall s | share | of which imports s | RSS at its end MiB | peak RSS so far MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for phase in phases:
        if phase.wall_s < 0.0005 and phase.imports_s < 0.0005:
            continue
        share = 100 * phase.wall_s / result.wall_s
        memory = f"{phase.rss_mb:.0f} | {phase.hwm_mb:.0f}" if phase.hwm_mb else " | "
        lines.append(f"| {phase.name} | {phase.wall_s:.2f} | {share:.1f} % | {phase.imports_s:.2f} | {memory} |")
    imports = sum(p.imports_s for p in phases)
    lines.append(
        f"| **whole process** | **{result.wall_s:.2f}** | 100 % | {imports:.2f} | "
        f"| {result.maxrss_mb:.0f} (ru_maxrss) |"
    )
    return "\n".join(lines)


def cpu_description() -> str:
    import torch

    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"{name}, {os.cpu_count()} CPU(s); torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; native bf16: {', '.join(bf16) or 'none'}; "
        f"Python {platform.python_version()}"
    )


def package_versions() -> str:
    from importlib.metadata import version

    names = ("diffusers", "transformers", "accelerate", "peft", "torch")
    return ", ".join(f"{n} {version(n)}" for n in names)


def dittune_revision() -> str:
    """The commit being measured, and whether src/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + (" with uncommitted changes in src/" if dirty.stdout.strip() else "")


def peer_revision(script: Path) -> str:
    """The peer's `check_min_version(...)` line: which diffusers release the script was written for."""
    match = re.search(r'check_min_version\("([^"]+)"\)', script.read_text(encoding="utf-8", errors="replace"))
    return match.group(1) if match else "unknown"


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-script", type=Path, help="path of diffusers' train_dreambooth_lora_sd3.py")
    parser.add_argument("--short", type=int, default=10, help="steps of the short runs (default 10)")
    parser.add_argument("--long", type=int, default=40, help="steps of the long runs (default 40)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each runs both tools at both lengths (2)")
    parser.add_argument("--threads", type=int, default=1, help="threads of every child (default 1)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32", help="fp32 (default) or bf16")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    parser.add_argument("--t5-length", type=int, default=256, help="T5 tokens (default 256)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--hidden", type=int, default=384, help="transformer width, multiple of 64 (default 384)")
    parser.add_argument("--layers", type=int, default=6, help="transformer blocks (default 6: ~30 M parameters)")
    parser.add_argument("--images", type=int, default=8, help="images in the dataset (default 8)")
    parser.add_argument("--bare-rounds", type=int, default=8, help="in-process ours/bare rounds (0: skip; 8)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the instrumented dittune run")
    parser.add_argument("--workdir", type=Path, help="keep model, data, caches and logs here (default: temp)")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/peer_sd3-cpu.md")
    parser.add_argument("--breakdown-child", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.breakdown_child is None:
        if args.peer_script is None or not args.peer_script.is_file():
            parser.error("--peer-script PATH (diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py) is needed")
        args.peer_script = args.peer_script.resolve()
        if args.long <= args.short or args.short < 3:
            parser.error("need 3 ≤ --short < --long")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.breakdown_child:
        return breakdown_child(args.breakdown_child)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    command = shlex.join(["python", "benchmarks/peer_sd3.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    load_before = os.getloadavg()

    def log(line: str) -> None:
        print(line, flush=True)

    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dittune-peer-")))
        else:
            root = args.workdir.resolve()
            root.mkdir(parents=True, exist_ok=True)
        log(f"building model and data in {root} ...")
        model = build_model(root / f"sd3-h{args.hidden}-l{args.layers}-s{args.size}", args.hidden, args.layers,
                            args.size)  # fmt: skip
        images, captioned = build_datasets(root, args.size, args.images)
        setup = Setup(args, root, model, images, captioned, root / f"cache-{args.precision}", args.threads)
        log("filling dittune's cache once (untimed; dittune's runs then only check it) ...")
        command_cache, env, _ = setup.command("dittune", args.short, "cache")
        command_cache[3] = "cache"
        cache_run = run_child("dittune", 0, command_cache, env, root / "logs" / "dittune-cache.log")
        log(f"  cache built in {cache_run.wall_s:.1f} s")
        log("warm-up: one short run of each (untimed) ...")
        for tool in ("dittune", "peer"):
            warm = setup.run(tool, args.short, "warmup")
            log(f"  {tool:8} {args.short} steps: {warm.wall_s:6.1f} s, peak RSS {warm.maxrss_mb:.0f} MiB")
        runs: list[RunResult] = []
        plan = [("dittune", args.short), ("peer", args.short), ("dittune", args.long), ("peer", args.long)]
        for index in range(args.rounds):
            order = plan if index % 2 == 0 else [plan[1], plan[0], plan[3], plan[2]]
            for tool, steps in order:
                result = setup.run(tool, steps, f"r{index}")
                runs.append(result)
                log(
                    f"  round {index + 1}/{args.rounds} {tool:8} {steps:3} steps: wall {result.wall_s:6.1f} s, CPU "
                    f"{result.cpu_s:6.1f} s (wall×threads÷CPU {result.contention(args.threads):.2f}), peak RSS "
                    f"{result.maxrss_mb:6.0f} MiB, step (bar) {med(result.step_times()):.3f} s"
                )
        breakdown: tuple[RunResult, list[Phase]] | None = None
        if not args.no_breakdown:
            log("instrumented dittune run (phases, -X importtime) ...")
            breakdown = run_breakdown(setup, args.long)
        bare: BareResult | None = None
        if args.bare_rounds:
            log("dittune step vs bare model step, in this process ...")
            bare = measure_bare(setup, args.bare_rounds, warmup=2)
        total_s = time.perf_counter() - started

    summary = summarise(runs, args.short, args.long)
    rows = ratio_rows(summary, args.short, args.long)
    sections = ["## dittune ÷ peer", "", main_table(rows), "", "## Every timed run", "", runs_table(runs, args.threads)]
    if bare is not None:
        text = bare_table(bare, summary["dittune"]["steady"], args.short, args.long)
        sections += ["", "## dittune step ÷ bare model step", "", text]
    if breakdown is not None:
        sections += [
            "",
            f"## Where a dittune run's wall time goes ({args.long} steps, `-X importtime`, one run)",
            "",
            breakdown_table(breakdown[1], breakdown[0]),
        ]
    load_after = os.getloadavg()
    params = base_parameters(model)
    setup_line = (
        f"SD3Transformer2DModel (SD3 layout, no QK norm) hidden {args.hidden}, {args.layers} blocks, "
        f"{args.hidden // 64} heads × 64, {params / 1e6:.1f} M parameters, with the tiny CLIP-L/G, T5 and VAE of "
        f"`dittune tiny sd3`; {args.images} images of {args.size} px, one caption for all (the peer's "
        f"--instance_prompt); batch {args.batch_size}; LoRA rank {args.rank} (alpha = rank) on "
        f"{', '.join(LORA_TARGETS)}; T5 length {args.t5_length}; AdamW lr {args.lr:g}, weight decay 1e-4, "
        f"max_grad_norm 1.0, constant schedule; precision {args.precision} (mixed_precision "
        f'"{PRECISIONS[args.precision]}" on both); seed 0; latents cached (dittune: on disk, filled once before '
        "timing, each run checks it; peer: --cache_latents, in memory, encoded in every run); no validation, "
        f"checkpoints or trackers; {args.threads} thread(s) per child; {args.rounds} rounds × "
        f"({args.short}, {args.long}) steps × (dittune, peer), order alternating, after one untimed warm-up run each"
    )
    header = [
        "# dittune vs diffusers' train_dreambooth_lora_sd3.py (cpu)",
        "",
        f"- date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {cpu_description()}",
        f"- dittune: {dittune_revision()}; {package_versions()}; peer script written for diffusers "
        f"{peer_revision(args.peer_script)}",
        f"- command: `{command}`",
        f"- setup: {setup_line}",
        f"- wall time {total_s:.0f} s; load average {load_before[0]:.2f} at start, {load_after[0]:.2f} at end",
        "",
        "Ratios are dittune ÷ peer (below 1: dittune is faster / smaller). See benchmarks/README.md, section "
        "`peer_sd3.py`.",
        "",
    ]
    text = "\n".join(header + sections) + "\n"
    log("")
    log(text)
    if args.write:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / "peer_sd3-cpu.md"
        path.write_text(text, encoding="utf-8")
        log(f"wrote {path}")
    met = [
        summary["dittune"]["steady"] / summary["peer"]["steady"] <= TARGETS["steady"],
        summary["dittune"]["wall_long"] / summary["peer"]["wall_long"] <= TARGETS["wall"],
        summary["dittune"]["rss"] / summary["peer"]["rss"] <= TARGETS["rss"],
    ]
    return 0 if all(met) else 1


def base_parameters(model: Path) -> int:
    """Parameters of the transformer, from its safetensors header (no model load)."""
    from safetensors import safe_open

    total = 0
    for file in (model / "transformer").glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += _numel(handle.get_slice(key))
    return total


def _numel(tensor_slice: Any) -> int:
    count = 1
    for dim in tensor_slice.get_shape():
        count *= int(dim)
    return count


if __name__ == "__main__":
    sys.exit(main())
