"""Trainer overhead: dittune's cached training step ÷ the bare model step on the same batch, in one run.

"ours" is the real training path: `build_run` + `Trainer`, caches already filled, each step exactly what
`Trainer.train` does per step (`optimizer_step()` — collation from the cache store, latent sampling, noise,
timesteps, RoPE, forward, loss, backward, gradient clipping, optimizer and LR-scheduler step, zero_grad — plus
the metrics line). Checkpoints, validation, trackers and the progress bar are off.

"bare" is the lower bound on the same model object, optimizer and autocast: one batch collated once, all
inputs (x_t, t, text tensors, RoPE) computed once outside the timed loop, then per step only
forward → MSE on the first 4 output channels against a fixed target → backward → optimizer.step() → zero_grad.

Both are timed in alternating rounds inside one process, so machine noise hits both alike; the ratio of
the medians is the overhead (target ≤ 1.10). Run `python benchmarks/trainer_overhead.py --help`.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import inspect
import os
import platform
import pstats
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch

TARGET = 1.10
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PRECISIONS = {"bf16": "bf16", "fp32": "no"}
"""Benchmark precision name → `train.mixed_precision`."""
COLOURS = ((220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 230, 20), (200, 30, 200), (30, 200, 200))
CAPTION_WORDS = ("red", "blue", "green", "yellow", "magenta", "cyan")


# ------------------------------------------------------------------------------------------ fixtures
def transformer_config(hidden: int, layers: int, size: int) -> dict[str, Any]:
    """A v1.2-style HunyuanDiT2DModel with 64-dim heads; text sizes match the tiny encoders (32 wide)."""
    if hidden % 64:
        raise SystemExit(f"--hidden {hidden} must be a multiple of 64 (heads of 64 dims)")
    return {
        "sample_size": size // 8,
        "patch_size": 2,
        "in_channels": 4,
        "num_layers": layers,
        "num_attention_heads": hidden // 64,
        "attention_head_dim": 64,
        "hidden_size": hidden,
        "cross_attention_dim": 32,
        "cross_attention_dim_t5": 32,
        "pooled_projection_dim": 32,
        "text_len": 77,
        "text_len_t5": 256,
        "mlp_ratio": 4.0,
        "activation_fn": "gelu-approximate",
        "learn_sigma": True,
        "use_style_cond_and_image_meta_size": False,
    }


def with_larger_transformer(folder: Path, family: str, variant: str, config: dict) -> Path:
    """`dittune tiny FAMILY` (tokenizers, encoders, VAE, scheduler) with its transformer replaced by one built
    from `config` (random weights, seed 0); reused if present. Shared by the benchmarks that need a bigger model."""
    import diffusers

    from dittune.models.registry import spec_class, tiny_builder

    if (folder / "transformer" / "config.json").is_file() and (folder / "model_index.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    tiny_builder(family)(folder, variant=variant, seed=0)
    shutil.rmtree(folder / "transformer")
    torch.manual_seed(0)
    model_class = getattr(diffusers, spec_class(family).denoiser_class)
    model_class(**config).save_pretrained(folder / "transformer", safe_serialization=True)
    return folder


def build_model(folder: Path, hidden: int, layers: int, size: int) -> Path:
    """The tiny Hunyuan-DiT pipeline with a larger transformer; reused if present."""
    return with_larger_transformer(folder, "hunyuan-dit", "v1.2", transformer_config(hidden, layers, size))


def build_dataset(folder: Path, size: int, count: int) -> Path:
    """`count` square images (one bucket, so every batch has the same shape) with captions."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image_path = folder / f"img_{index:03d}.png"
        if image_path.is_file():
            continue
        colour = COLOURS[index % len(COLOURS)]
        image = Image.new("RGB", (size, size), (255, 255, 255))
        inset = size // 8 + (index * size // 64) % (size // 4)
        ImageDraw.Draw(image).ellipse([inset, inset, size - inset, size - inset], colour)
        image.save(image_path)
        word = CAPTION_WORDS[index % len(CAPTION_WORDS)]
        (folder / f"img_{index:03d}.txt").write_text(f"a {word} circle number {index} on a white background")
    return folder


def make_config(root: Path, model: Path, data: Path, method: str, precision: str, size: int, batch: int) -> Any:
    from dittune.config.load import validate_config

    return validate_config(
        {
            "output_dir": str(root / "runs" / f"{method}-{precision}"),
            "model": {"family": "hunyuan-dit", "path": str(model)},
            "data": {"path": str(data), "resolution": size, "resolution_type": "pixel"},
            "train": {
                "method": method,
                "max_steps": 1_000_000,
                "batch_size": batch,
                "mixed_precision": PRECISIONS[precision],
                "trackers": [],
                "log_every_steps": 1,
            },
            "cache": {"dir": str(root / "cache")},
            "checkpoint": {"every_steps": 1_000_000},
        }
    )


# ------------------------------------------------------------------------------------------ the two steps
@dataclass
class Case:
    """One configuration (method × precision): its trainer and the two step functions."""

    method: str
    precision: str
    trainer: Any
    ours: Callable[[], None]
    bare: Callable[[], None]
    ours_ms: list[float] = field(default_factory=list)
    bare_ms: list[float] = field(default_factory=list)
    ours_cpu_ms: list[float] = field(default_factory=list)
    bare_cpu_ms: list[float] = field(default_factory=list)
    profile: list[tuple[str, float]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.method} {self.precision}"


def ours_step(trainer: Any) -> Callable[[], None]:
    """One iteration of `Trainer.train`'s loop, minus the progress bar and the (disabled) side tasks."""

    def step() -> None:
        started = time.perf_counter()
        loss, logs, samples = trainer.optimizer_step()
        trainer.step += 1
        trainer.log_step(loss, logs, samples, started)

    return step


def bare_step(trainer: Any) -> Callable[[], None]:
    """Forward + MSE + backward + optimizer step on one fixed batch, every input precomputed."""
    from dittune.models.hunyuan_dit.spec import rotary_embedding

    run = trainer.run
    _, items = run.sampler.next_batch()
    generator = torch.Generator().manual_seed(1234)
    batch = trainer.batches.collate(items, generator)
    device = run.accelerator.device
    model = run.denoiser
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # the torch optimizer inside accelerate's wrapper
    cfg = run.spec.transformer_config
    if run.spec.uses_size_conditioning:
        raise SystemExit("the bare step assumes a v1.2-style transformer (no size/style conditioning)")

    x0 = run.spec.latents_from_moments(batch.moments, generator, sample=False)
    with run.accelerator.autocast():
        autocast = torch.is_autocast_enabled(device.type)
    compute_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    dtype = torch.float32 if autocast else compute_dtype
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(device)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=generator).to(device)
    x_t = (0.6 * x0 + 0.8 * noise).to(dtype)
    target = torch.randn(x0.shape, generator=generator).to(device)
    rope = rotary_embedding(int(cfg["attention_head_dim"]), x0.shape[-2], x0.shape[-1], int(cfg["patch_size"]), device)
    text = batch.text
    kwargs = {
        "encoder_hidden_states": text["prompt_embeds"].to(dtype),
        "text_embedding_mask": text["prompt_attention_mask"],
        "encoder_hidden_states_t5": text["prompt_embeds_2"].to(dtype),
        "text_embedding_mask_t5": text["prompt_attention_mask_2"],
        "image_rotary_emb": rope,
        "return_dict": False,
    }
    timesteps = t.to(dtype)

    def step() -> None:
        with run.accelerator.autocast():
            out = model(x_t, timesteps, **kwargs)[0]
        loss = torch.nn.functional.mse_loss(out[:, :4].float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ------------------------------------------------------------------------------------------ measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) milliseconds per step over `steps` consecutive steps.

    CPU time counts the work of all this process's threads and is barely affected by other processes
    competing for the cores; on a shared machine, compare it with `--threads 1`.
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - wall) * 1000 / steps, (time.process_time() - cpu) * 1000 / steps


def profile_items() -> list[tuple[str, list[Any]]]:
    """(label, functions) whose cumulative cProfile time is reported; indented labels are parts of the one above."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from diffusers import HunyuanDiT2DModel
    from torch.optim.lr_scheduler import LRScheduler

    from dittune.cache.store import CacheStore
    from dittune.models import diffusion_objective as objective
    from dittune.models.hunyuan_dit import spec
    from dittune.train.batches import CachedBatches
    from dittune.train.metrics import MetricsLog
    from dittune.train.trainer import Trainer

    return [
        ("collate (cache loads + stack + to device)", [CachedBatches.collate]),
        ("  CacheStore.load (safetensors)", [CacheStore.load]),
        ("compute_loss (everything below)", [spec.HunyuanDiTSpec.compute_loss]),
        ("  latents_from_moments (posterior sample)", [spec.HunyuanDiTSpec.latents_from_moments]),
        ("  add_noise", [objective.add_noise]),
        ("  rotary_embedding (RoPE)", [spec.rotary_embedding]),
        ("  denoiser forward", [HunyuanDiT2DModel.forward]),
        ("  learned_sigma_v_loss", [objective.learned_sigma_v_loss]),
        ("    vlb_bits", [objective.vlb_bits]),
        ("accelerator.backward", [Accelerator.backward]),
        ("accelerator.clip_grad_norm_", [Accelerator.clip_grad_norm_]),
        ("optimizer.step (accelerate wrapper)", [AcceleratedOptimizer.step]),
        ("lr_scheduler.step", [LRScheduler.step]),
        ("optimizer.zero_grad", [AcceleratedOptimizer.zero_grad]),
        ("metrics (_metrics + MetricsLog.log)", [Trainer._metrics, MetricsLog.log]),
    ]


EXTRA_WORK = (
    "collate (cache loads + stack + to device)",
    "latents_from_moments (posterior sample)",
    "add_noise",
    "rotary_embedding (RoPE)",
    "learned_sigma_v_loss",
    "accelerator.clip_grad_norm_",
    "lr_scheduler.step",
    "metrics (_metrics + MetricsLog.log)",
)
"""Profiled parts that the bare step does not do at all (the rest it does too, on the same objects)."""
EXTRA_LABEL = "**sum of the parts bare does not do**"
EXTRA_SHARE_LABEL = "… as % of the bare step (median wall)"


def _code_key(function: Any) -> tuple[str, int, str]:
    code = inspect.unwrap(function).__code__
    return code.co_filename, code.co_firstlineno, code.co_name


def profile_ours(case: Case, steps: int) -> list[tuple[str, float]]:
    """cProfile cumulative ms/step of the parts of our step (profiler overhead included)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        case.ours()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows: list[tuple[str, float]] = []
    for label, functions in profile_items():
        seconds = sum(stats.get(_code_key(f), (0, 0, 0, 0.0))[3] for f in functions)
        rows.append((label, seconds * 1000 / steps))
    extra = sum(value for label, value in rows if label.strip() in EXTRA_WORK)
    rows.append((EXTRA_LABEL, extra))
    rows.append((EXTRA_SHARE_LABEL, 100 * extra / statistics.median(case.bare_ms) if case.bare_ms else 0.0))
    return rows


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def build_cases(root: Path, model: Path, data: Path, methods: list[str], precision: str, args: Any) -> list[Case]:
    from accelerate.state import AcceleratorState

    from dittune.train.runner import check
    from dittune.train.setup import build_run, make_accelerator
    from dittune.train.trainer import Trainer

    AcceleratorState._reset_state()  # mixed precision is process-global in accelerate
    cases = []
    for method in methods:
        cfg = make_config(root, model, data, method, precision, args.size, args.batch_size)
        shutil.rmtree(cfg.output_dir, ignore_errors=True)
        check(cfg)
        cfg.output_dir.mkdir(parents=True)
        with quiet():
            run = build_run(cfg, make_accelerator(cfg), progress=False, announce=lambda _line: None)
        if args.compile:  # train.compile: the same blocks compiled for both paths (same model object)
            from dittune.models.compile import compile_blocks

            compile_blocks(run.spec, run.accelerator.unwrap_model(run.denoiser))
        trainer = Trainer(run, progress=False)
        cases.append(Case(method, precision, trainer, ours_step(trainer), bare_step(trainer)))
    return cases


def measure(cases: list[Case], args: Any, device: torch.device, log: Callable[[str], None]) -> None:
    for case in cases:  # warm up both paths (allocator, oneDNN kernels, optimizer state)
        for fn in (case.ours, case.bare):
            time_steps(fn, args.warmup, device)
    for round_index in range(args.rounds):
        order = cases if round_index % 2 == 0 else cases[::-1]
        for position, case in enumerate(order):
            ours_first = (round_index + position) % 2 == 0
            for which in ("ours", "bare") if ours_first else ("bare", "ours"):
                wall, cpu = time_steps(case.ours if which == "ours" else case.bare, args.steps, device)
                (case.ours_ms if which == "ours" else case.bare_ms).append(wall)
                (case.ours_cpu_ms if which == "ours" else case.bare_cpu_ms).append(cpu)
            log(
                f"  round {round_index + 1}/{args.rounds} {case.name:<10} ours {case.ours_ms[-1]:8.1f} ms  "
                f"bare {case.bare_ms[-1]:8.1f} ms  ratio {case.ours_ms[-1] / case.bare_ms[-1]:.3f}  "
                f"(CPU time ratio {case.ours_cpu_ms[-1] / case.bare_cpu_ms[-1]:.3f})"
            )
    if args.profile:
        for case in cases:
            case.profile = profile_ours(case, args.steps)


# ------------------------------------------------------------------------------------------ reporting
def ratio(case: Case) -> float:
    """The overhead: median wall time of ours ÷ median wall time of bare."""
    return statistics.median(case.ours_ms) / statistics.median(case.bare_ms)


def cpu_ratio(case: Case) -> float:
    return statistics.median(case.ours_cpu_ms) / statistics.median(case.bare_cpu_ms)


def results_table(cases: list[Case]) -> str:
    lines = [
        "| config | ours ms/step | bare ms/step | **ratio** | per-round ratio median [min–max] "
        "| ours CPU ms/step | bare CPU ms/step | CPU-time ratio | ratio ≤ 1.10 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for case in cases:
        rounds = [o / b for o, b in zip(case.ours_ms, case.bare_ms)]
        lines.append(
            f"| {case.name} | {statistics.median(case.ours_ms):.1f} | {statistics.median(case.bare_ms):.1f} "
            f"| **{ratio(case):.3f}** | {statistics.median(rounds):.3f} [{min(rounds):.3f}–{max(rounds):.3f}] "
            f"| {statistics.median(case.ours_cpu_ms):.1f} | {statistics.median(case.bare_cpu_ms):.1f} "
            f"| {cpu_ratio(case):.3f} | {'yes' if ratio(case) <= TARGET else 'NO'} |"
        )
    return "\n".join(lines)


def profile_table(cases: list[Case]) -> str:
    profiled = [c for c in cases if c.profile]
    if not profiled:
        return ""
    lines = [
        "| part of `optimizer_step` (cumulative, cProfile) | " + " | ".join(f"{c.name} ms" for c in profiled) + " |",
        "|---|" + "---:|" * len(profiled),
    ]
    for row, (label, _) in enumerate(profiled[0].profile):
        cells = " | ".join(f"{c.profile[row][1]:.2f}" for c in profiled)
        lines.append(f"| {label.replace('  ', '&nbsp;&nbsp;')} | {cells} |")
    return "\n".join(lines)


def machine_line(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    parts = [
        f"{cpu}, {os.cpu_count()} CPU(s), torch {torch.__version__} ({torch.get_num_threads()} threads)",
        f"Python {platform.python_version()}, {platform.system()}",
    ]
    if device.type == "cuda":
        parts.insert(0, torch.cuda.get_device_name(device))
    return "; ".join(parts)


def describe_setup(run: Any, args: Any) -> str:
    cfg = run.cfg
    base = sum(p.numel() for n, p in run.denoiser.named_parameters() if ".lora_" not in n)
    targets = "/".join(cfg.lora.targets or run.spec.default_lora_targets)
    return (
        f"HunyuanDiT2DModel hidden {args.hidden}, {args.layers} layers, {args.hidden // 64} heads × 64, "
        f"{base / 1e6:.1f} M base parameters; {args.size}×{args.size} images → {(args.size // 16) ** 2} image "
        f"tokens + 77/256 text tokens; batch {args.batch_size}; {args.rounds} rounds × {args.steps} steps per path "
        f"and config after {args.warmup} warm-up steps; LoRA rank {cfg.lora.rank} on {targets}; "
        f"{cfg.train.optimizer}; max_grad_norm {cfg.train.max_grad_norm}; caption dropout {cfg.train.caption_dropout}"
        + ("; transformer blocks compiled (train.compile)" if args.compile else "")
    )


def contention_line(cases: list[Case]) -> str:
    """How much other processes got in the way: wall × threads ÷ CPU time of the bare step (1.00 = undisturbed)."""
    threads = torch.get_num_threads()
    values = [statistics.median(c.bare_ms) * threads / statistics.median(c.bare_cpu_ms) for c in cases if c.bare_cpu_ms]
    text = ", ".join(f"{c.name} {v:.2f}" for c, v in zip(cases, values))
    return (
        f"wall × threads ÷ CPU time of the bare step: {text} (1.00: the process had its {threads} core(s) to "
        "itself; well above 1: other processes competed, and with --threads 1 the CPU-time ratio is the more "
        "reliable one)"
    )


def write_results(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per measurement block (default 1)")
    parser.add_argument("--rounds", type=int, default=16, help="alternating ours/bare rounds per config (default 16)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each path first (default 2)")
    add_workload_args(parser)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="also cProfile the parts of our step (after timing)")
    parser.add_argument("--workdir", type=Path, help="keep model, data and caches here (default: a temp folder)")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/trainer_overhead-<dev>.md")
    parser.add_argument("--compile", action="store_true", help="compile the transformer blocks (train.compile)")
    args = parser.parse_args(argv)
    check_workload_args(parser, args)
    return args


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The options that size the workload (methods, precisions, image size, batch, model width and depth)."""
    parser.add_argument("--methods", default="lora,full", help="comma list of lora, full (default both)")
    parser.add_argument("--precisions", default="bf16,fp32", help="comma list of bf16, fp32 (default both)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels, one square bucket (default 256)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--hidden", type=int, default=384, help="transformer width, multiple of 64 (default 384)")
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks (default 8)")
    parser.add_argument("--images", type=int, default=8, help="images in the dataset (default 8)")


def check_workload_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Split --methods/--precisions into `method_list`/`precision_list` and check them and the sizes."""
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.precision_list = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for name in args.method_list:
        if name not in ("lora", "full"):
            parser.error(f"--methods: unknown method {name!r}")
    for name in args.precision_list:
        if name not in PRECISIONS:
            parser.error(f"--precisions: unknown precision {name!r}")
    if args.size % 16 or args.size < 64:
        parser.error("--size must be a multiple of 16, at least 64")
    if args.images < args.batch_size:
        parser.error("--images must be at least --batch-size")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    command = shlex.join(["python", "benchmarks/trainer_overhead.py", *(sys.argv[1:] if argv is None else argv)])

    def log(line: str) -> None:
        print(line, flush=True)

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
        setup_s = time.perf_counter() - started
        cases: list[Case] = []
        setup = ""
        for precision in args.precision_list:
            log(f"{precision}: building runs ({', '.join(args.method_list)}) and warming up ...")
            group = build_cases(root, model, data, args.method_list, precision, args)
            setup = setup or describe_setup(group[0].trainer.run, args)
            measure(group, args, device, log)
            cases += group
            for case in group:  # release the models before the next precision group
                case.trainer = None
                case.ours = case.bare = _released
            del group
        total_s = time.perf_counter() - started

    summary = results_table(cases)
    profile = profile_table(cases)
    load_after = os.getloadavg()
    log("")
    log(summary)
    if profile:
        log("")
        log(profile)
    log(
        f"\nbenchmark wall time {total_s:.0f} s (setup {setup_s:.0f} s); load average {load_before[0]:.2f} → "
        f"{load_after[0]:.2f}; {contention_line(cases)}"
    )
    if args.write:
        path = RESULTS_DIR / f"trainer_overhead-{device.type}{'-compiled' if args.compile else ''}.md"
        body = [
            f"# Trainer overhead ({device.type})",
            "",
            f"- date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"- machine: {machine_line(device)}",
            f"- command: `{command}`",
            f"- setup: {setup}",
            f"- wall time: {total_s:.0f} s (building model and images {setup_s:.0f} s); load average "
            f"{load_before[0]:.2f} at start, {load_after[0]:.2f} at end",
            f"- {contention_line(cases)}",
            "",
            "ratio = median(ours) ÷ median(bare) over the rounds; ours = one `Trainer.train` loop iteration on "
            "cached data, bare = forward + MSE + backward + optimizer step on one precomputed batch, same model "
            f"and optimizer. Target ≤ {TARGET:.2f}. See benchmarks/README.md for how to read it.",
            "",
            summary,
        ]
        if profile:
            body += ["", "Where our step's time goes (cProfile, ms per step, profiler overhead included):", "", profile]
        write_results(path, "\n".join(body) + "\n")
        log(f"wrote {path}")
    return 0 if all(ratio(c) <= TARGET for c in cases) else 1


def _released() -> None:
    raise RuntimeError("this case's run was released")


if __name__ == "__main__":
    sys.exit(main())
