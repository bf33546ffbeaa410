"""Start-up: time from `dittune train CONFIG` to its first training step on a warm cache, beyond model loading.

A tiny model and N images are built (or reused with `--workdir`), the cache is filled by one untimed run, and
then `python -m dittune train CFG` is started as a child process per round, in two ways:

- **plain**: exactly that command; the parent times it from just before the process is spawned to the first
  line of `metrics.jsonl` (the end of the first step), polling every 2 ms.
- **probed**: the same command line run through this script's `--child` mode, which installs timers on the
  parts of the start (imports, config and preflight, spec inspection, cache check, model loading, accelerate,
  trackers, summary, the first step) and then runs `dittune` exactly as `python -m dittune` does. It leaves
  after the first metrics line.

"beyond model loading" = time to the start of the first step − time inside the denoiser/VAE/text-encoder loads
(their imports not included). The issue's target is ≤ 3 s on 2 cores. Run `python benchmarks/startup.py --help`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Pair = tuple[float, float]
TARGET_S = 3.0
RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLOURS = ((220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 230, 20), (200, 30, 200), (30, 200, 200))
PHASES = (
    ("interpreter", "interpreter start (python itself, before dittune)"),
    ("imports", "imports (every module, wherever imported; by top-level package below)"),
    ("config", "CLI, config load and validation, preflight"),
    ("inspect", "spec: inspect the model folder"),
    ("plan", "  cache check: discover images, plan buckets"),
    ("latents", "  cache check: latent keys and lookups"),
    ("text", "  cache check: text keys and lookups"),
    ("prepare_rest", "  cache check: the rest (fingerprint memo, release memory)"),
    ("model", "model loading (denoiser, VAE, text encoders)"),
    ("scheduler", "noise scheduler from the folder"),
    ("accelerate", "accelerator; rest of build_run (LoRA injection, optimizer, prepare, sampler)"),
    ("trackers", "trackers init"),
    ("summary", "start-up summary"),
    ("trainer", "Trainer() (collation setup, metrics file)"),
    ("other", "everything else"),
)


# ------------------------------------------------------------------------------------------ fixtures
def build_fixtures(root: Path, family: str, images: int, size: int, trackers: list[str]) -> Path:
    """Tiny model, `images` images with captions, and the config; returns the config path."""
    from PIL import Image, ImageDraw

    from dittune.models.registry import tiny_builder

    model = root / "model" / family
    if not (model / "model_index.json").is_file():
        shutil.rmtree(model, ignore_errors=True)
        tiny_builder(family)(model, seed=0)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for index in range(images):
        path = data / f"img_{index:04d}.png"
        if path.is_file():
            continue
        image = Image.new("RGB", (size, size), (255, 255, 255))
        inset = size // 8 + index % (size // 4)
        ImageDraw.Draw(image).ellipse([inset, inset, size - inset, size - inset], COLOURS[index % len(COLOURS)])
        image.save(path)
        (data / f"img_{index:04d}.txt").write_text(f"circle number {index} on a white background")
    config = root / f"{family}.toml"
    config.write_text(
        f'output_dir = "{root / "run"}"\n'
        f'[model]\nfamily = "{family}"\npath = "{model}"\n'
        f'[data]\npath = "{data}"\nresolution = {size}\nresolution_type = "pixel"\n'
        '[train]\nmethod = "lora"\nmax_steps = 1\nbatch_size = 2\nmixed_precision = "no"\n'
        f"trackers = {json.dumps(trackers)}\n"
        f'[cache]\ndir = "{root / "cache"}"\n'
        "[checkpoint]\nevery_steps = 1000000\n"
    )
    return config


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


# ------------------------------------------------------------------------------------------ the probed child
class Probes:
    """Exclusive wall and CPU seconds per phase; an import is a phase too ("import <top-level package>").

    Every probe and every module import is a frame on one stack; a frame's time less that of the frames
    nested in it goes to its phase, so nothing is counted twice and the phases add up.
    """

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}
        self.marks: dict[str, Any] = {}
        self._stack: list[list[float]] = []  # [wall start, cpu start, nested wall, nested cpu]

    def timed(self, phase: str, call: Callable[[], Any]) -> Any:
        frame = [time.perf_counter(), time.process_time(), 0.0, 0.0]
        self._stack.append(frame)
        try:
            return call()
        finally:
            self._stack.pop()
            wall, cpu = time.perf_counter() - frame[0], time.process_time() - frame[1]
            total = self.totals.setdefault(phase, [0.0, 0.0])
            total[0] += wall - frame[2]
            total[1] += cpu - frame[3]
            if self._stack:
                self._stack[-1][2] += wall
                self._stack[-1][3] += cpu

    def install_import_timer(self) -> None:
        import importlib._bootstrap as bootstrap

        original = bootstrap._find_and_load

        def find_and_load(name: str, import_: Any) -> Any:
            return self.timed("import " + name.partition(".")[0], lambda: original(name, import_))

        bootstrap._find_and_load = find_and_load

    def wrap(self, owner: Any, name: str, phase: str, after: Callable[[], None] | None = None) -> None:
        original = getattr(owner, name)

        def probed(*args: Any, **kwargs: Any) -> Any:
            try:
                return self.timed(phase, lambda: original(*args, **kwargs))
            finally:
                if after is not None:
                    after()

        setattr(owner, name, probed)


def run_child(result_file: Path, family: str, argv: list[str], profile: Path | None) -> None:
    """`python -m dittune ARGV` with probes; writes the timings to `result_file` after the first metrics line."""
    entered, entered_cpu = time.time(), time.process_time()
    probes = Probes()
    probes.install_import_timer()
    import cProfile

    profiler = cProfile.Profile() if profile else None
    from dittune.cli import main as cli
    from dittune.models.registry import spec_class
    from dittune.train import prepare, runner, setup, summary, trainer
    from dittune.train.metrics import MetricsLog

    spec = spec_class(family)

    def first_line() -> None:
        probes.marks["first_metrics"] = time.time()
        probes.marks["cpu"] = time.process_time()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(profile))
        marks = {"entered": entered, "entered_cpu": entered_cpu, **probes.marks}
        result_file.write_text(json.dumps(marks))
        sys.stdout.flush()
        os._exit(0)

    step = trainer.Trainer.optimizer_step

    def optimizer_step(self: Any) -> Any:
        if "first_step" not in probes.marks:
            probes.marks.update(first_step=time.time(), first_step_cpu=time.process_time())
            probes.marks["phases"] = {name: list(value) for name, value in probes.totals.items()}
        return step(self)

    trainer.Trainer.optimizer_step = optimizer_step  # type: ignore[method-assign]
    probes.wrap(cli, "load_config", "config")
    probes.wrap(runner, "check", "config")
    probes.wrap(setup, "load_spec", "inspect")
    for name in ("load_denoiser", "load_vae", "load_text_encoders"):
        probes.wrap(spec, name, "model")
    probes.wrap(spec, "load_scheduler", "scheduler")
    probes.wrap(setup, "fill_caches", "prepare_rest")
    probes.wrap(prepare, "plan_data", "plan")
    probes.wrap(prepare, "ensure_latents", "latents")
    probes.wrap(prepare, "ensure_text_embeddings", "text")
    probes.wrap(setup, "build_run", "accelerate")
    probes.wrap(setup, "make_accelerator", "accelerate")
    probes.wrap(summary, "startup_summary", "summary")
    probes.wrap(trainer.Trainer, "__init__", "trainer")
    from accelerate import Accelerator

    probes.wrap(Accelerator, "init_trackers", "trackers")
    probes.wrap(MetricsLog, "log", "first_step", after=first_line)
    if profiler is not None:
        profiler.enable()
    sys.argv = ["dittune", *argv]
    import runpy

    runpy.run_module("dittune", run_name="__main__", alter_sys=True)
    raise SystemExit("the run ended without writing a metrics line")


# ------------------------------------------------------------------------------------------ the parent
def spawn(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, float]:
    started = time.time()
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), started


def plain_round(config: Path, env: dict[str, str]) -> float:
    """Seconds from spawning `python -m dittune train CFG` to its first metrics line (the end of step 1)."""
    metrics = config.parent / "run" / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    process, started = spawn([sys.executable, "-m", "dittune", "train", str(config)], env)
    while not (metrics.is_file() and metrics.stat().st_size):
        if process.poll() is not None:
            raise SystemExit(f"dittune train failed:\n{process.stderr.read() if process.stderr else ''}")
        time.sleep(0.002)
    elapsed = time.time() - started
    process.wait()
    return elapsed


def floor_round(code: str, env: dict[str, str]) -> Pair:
    """(wall, CPU) seconds from spawning `python -c CODE` to the end of CODE (interpreter exit not counted)."""
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport time; print(time.time(), time.process_time())"],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    end, cpu = (float(x) for x in done.stdout.split()[-2:])
    return end - started, cpu


def floor_codes(family: str) -> dict[str, str]:
    """Reference starts: torch alone, and the libraries a LoRA run of `family` imports (its denoiser class)."""
    from dittune.models.registry import spec_class

    denoiser = spec_class(family).denoiser_class
    return {
        "floor_torch": "import torch",
        "floor_libraries": f"import torch, accelerate, peft, diffusers; diffusers.{denoiser}; diffusers.AutoencoderKL",
    }


def probed_round(config: Path, family: str, env: dict[str, str], profile: Path | None = None) -> dict[str, Pair]:
    """(wall, CPU) seconds per part of one probed start: PHASES, "import <package>" and the totals."""
    out = config.parent / "probe.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", str(out), "--family", family]
    cmd += ["--profile-out", str(profile)] if profile else []
    process, started = spawn([*cmd, "--", "train", str(config)], env)
    _, stderr = process.communicate()
    if not out.is_file():
        raise SystemExit(f"probed run failed:\n{stderr}")
    raw = json.loads(out.read_text())
    parts: dict[str, Pair] = {name: tuple(value) for name, value in raw["phases"].items()}  # type: ignore[misc]
    parts["interpreter"] = (raw["entered"] - started, raw["entered_cpu"])
    imports = [value for name, value in parts.items() if name.startswith("import ")]
    parts["imports"] = (sum(w for w, _ in imports), sum(c for _, c in imports))
    counted = [value for name, value in parts.items() if not name.startswith("import ")]
    to_first = (raw["first_step"] - started, raw["first_step_cpu"])
    parts["other"] = (to_first[0] - sum(w for w, _ in counted), to_first[1] - sum(c for _, c in counted))
    model = parts.get("model", (0.0, 0.0))
    return {
        **parts,
        "to_first_step": to_first,
        "beyond_model": (to_first[0] - model[0], to_first[1] - model[1]),
        "own": (
            to_first[0] - model[0] - parts["imports"][0] - parts["interpreter"][0],
            to_first[1] - model[1] - parts["imports"][1] - parts["interpreter"][1],
        ),
        "first_step": (raw["first_metrics"] - raw["first_step"], raw["cpu"] - raw["first_step_cpu"]),
    }


def machine_info(threads: int) -> list[str]:
    import torch

    return [
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}",
        f"- threads per child: {threads or 'torch default'}; Python {platform.python_version()}",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
    ]


def report(args: argparse.Namespace, probed: list[dict[str, Pair]], plain: list[float]) -> list[str]:
    def cell(name: str, bold: bool = False) -> str:
        walls = [r.get(name, (0.0, 0.0))[0] for r in probed]
        cpu = statistics.median(r.get(name, (0.0, 0.0))[1] for r in probed)
        mark = "**" if bold else ""
        return f"{mark}{statistics.median(walls):.3f}{mark} [{min(walls):.3f}–{max(walls):.3f}] | {cpu:.3f}"

    packages = {name for r in probed for name in r if name.startswith("import ")}
    by_size = sorted(packages, key=lambda name: -statistics.median(r.get(name, (0.0, 0.0))[0] for r in probed))
    lines = [
        f"Start on a warm cache: {args.family}, {args.images} images of {args.size} px, LoRA, fp32, "
        f"trackers [{args.trackers}] "
        f'(`mixed_precision = "no"`); {args.rounds} probed and {args.rounds} plain starts, alternating.',
        "Seconds: wall median [min–max] | CPU median (this process's CPU time).",
        "",
        "| part | wall s | CPU s |",
        "|---|---|---|",
    ]
    for name, label in PHASES:
        if any(name in r for r in probed):
            lines.append(f"| {label} | {cell(name)} |")
        if name == "imports":
            lines += [f"|   {package} (own modules) | {cell(package)} |" for package in by_size[:12]]
    lines += [
        f"| **to the first step** | {cell('to_first_step', True)} |",
        f"| **beyond model loading** (target ≤ {TARGET_S:g} s) | {cell('beyond_model', True)} |",
        f"| **beyond model loading and imports: dittune's own start-up work** | {cell('own', True)} |",
        f"| the first step itself (not part of the start) | {cell('first_step')} |",
        f"| reference: `python -c 'import torch'` (whole process) | {cell('floor_torch')} |",
        f"| reference: `python -c` importing torch, accelerate, peft, diffusers + the denoiser class "
        f"(whole process) | {cell('floor_libraries')} |",
        f"| to the first step − the library reference | {cell('beyond_floor', True)} |",
        f"| plain `python -m dittune train` to the first metrics line (incl. step 1) | "
        f"{statistics.median(plain):.3f} [{min(plain):.3f}–{max(plain):.3f}] | |",
    ]
    wall, cpu = (statistics.median(r["to_first_step"][i] for r in probed) for i in (0, 1))
    lines += ["", f"wall × threads ÷ CPU time to the first step: {wall * max(args.threads, 1) / cpu:.2f} "
              "(1.00: undisturbed; > 1: the process waited for the cores)"]  # fmt: skip
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="hunyuan-dit")
    parser.add_argument("--images", type=int, default=200, help="dataset size (cache entries scale with it)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=5, help="probed and plain starts, alternating")
    parser.add_argument("--trackers", default="tensorboard", help="train.trackers, comma-separated ('' for none)")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of each child (0: torch's choice)")
    parser.add_argument("--workdir", type=Path, help="keep model, images and cache here between runs")
    parser.add_argument("--profile", action="store_true", help="cProfile one probed start; print the top functions")
    parser.add_argument("--write", action="store_true", help="write results/startup-cpu.md")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        run_child(args.child, args.family, [a for a in rest if a != "--"], args.profile_out)
        return 1
    root = args.workdir or Path(tempfile.mkdtemp(prefix="dittune-startup-"))
    root.mkdir(parents=True, exist_ok=True)
    env = child_env(args.threads)
    try:
        trackers = [t for t in args.trackers.split(",") if t]
        config = build_fixtures(root, args.family, args.images, args.size, trackers)
        warm = subprocess.run([sys.executable, "-m", "dittune", "train", str(config)], env=env, capture_output=True)
        if warm.returncode:
            raise SystemExit(f"warm-up run failed:\n{warm.stderr.decode()[-4000:]}")
        probed, plain, floor_rows = [], [], []
        floors = floor_codes(args.family)
        for index in range(args.rounds):
            for which in (0, 1, 2) if index % 2 == 0 else (2, 1, 0):
                if which == 0:
                    probed.append(probed_round(config, args.family, env))
                elif which == 1:
                    plain.append(plain_round(config, env))
                else:
                    floor_rows.append({name: floor_round(code, env) for name, code in floors.items()})
        for row, floor in zip(probed, floor_rows):
            row.update(floor)
            row["beyond_floor"] = tuple(row["to_first_step"][i] - floor["floor_libraries"][i] for i in (0, 1))
        lines = report(args, probed, plain)
        print("\n".join(lines))
        if args.profile:
            import pstats

            stats_file = root / "startup.prof"
            probed_round(config, args.family, env, profile=stats_file)
            pstats.Stats(str(stats_file)).sort_stats("cumulative").print_stats(40)
        if args.write:
            command = "python benchmarks/startup.py " + shlex.join(sys.argv[1:])
            text = ["# startup (CPU)", "", *machine_info(args.threads), f"- command: `{command}`", "", *lines, ""]
            RESULTS_DIR.mkdir(exist_ok=True)
            (RESULTS_DIR / "startup-cpu.md").write_text("\n".join(text))
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if statistics.median(r["beyond_model"][0] for r in probed) <= TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
