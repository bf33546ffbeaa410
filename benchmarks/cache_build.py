"""Cache building: images per second of dittune's latent-cache path against a bare VAE-encode loop, in one run.

"ours" is the real path `dittune.train.prepare.prepare_data` (what `dittune cache` and `dittune train` run):
discovery and bucket planning, content fingerprints of the images (their memo entries are dropped before each
round, as on a first build; the model's stay), cache keys, lookups, loading and resizing, `spec.encode_pixels`
in `cache.vae_batch_size` batches, and the atomic safetensors writes. The text cache is filled once beforehand,
so only latents are built; the VAE is loaded once and handed in (`get_vae`), so its loading is not timed.

"bare" is the lower bound on the same VAE object: the same images loaded, resized and cropped to tensors by the
same `load_pixels` (placements computed outside the timing), stacked in the same batch size, `vae.encode(...)`,
posterior mean and log-variance moved to the CPU; nothing is written.

Rounds alternate the order of ours and bare; the ratio of images/s (ours ÷ bare) is the figure of merit
(target ≥ 0.9). Run `python benchmarks/cache_build.py --help`.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import json
import os
import platform
import pstats
import shlex
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch

TARGET = 0.9
RESULTS_DIR = Path(__file__).resolve().parent / "results"
VAES = {"tiny": (32, 32, 32, 32), "small": (64, 64, 128, 128), "medium": (64, 128, 256, 256)}
"""`--vae` → encoder block widths (4 blocks: ×8 down, one layer per block). "tiny" is the test VAE."""


# ------------------------------------------------------------------------------------------ fixtures
def build_model(folder: Path, family: str, vae: str) -> Path:
    """The family's tiny pipeline with its VAE replaced by one of `VAES` (same latent layout); reused if present."""
    from dittune.models.registry import tiny_builder
    from dittune.models.tiny_parts import tiny_autoencoder

    marker = folder / "vae" / "benchmark.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"vae": vae}:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    tiny_builder(family)(folder, seed=0)
    config = json.loads((folder / "vae" / "config.json").read_text())
    torch.manual_seed(0)
    model = tiny_autoencoder(
        VAES[vae],
        latent_channels=config["latent_channels"],
        scaling_factor=config["scaling_factor"],
        shift_factor=config.get("shift_factor"),
        quant_convs=config.get("use_quant_conv", True),
    )
    shutil.rmtree(folder / "vae")
    model.save_pretrained(folder / "vae", safe_serialization=True)
    marker.write_text(json.dumps({"vae": vae}))
    return folder


def build_dataset(folder: Path, count: int, source: int) -> Path:
    """`count` square photos-like images of `source` px (noise + shapes, so PNG decoding is not trivial)."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        path = folder / f"img_{index:04d}.jpg"
        if path.is_file():
            continue
        noise = rng.integers(0, 256, (source, source, 3), dtype=np.uint8)
        image = Image.fromarray(noise)
        ImageDraw.Draw(image).ellipse([source // 4, source // 4, 3 * source // 4, 3 * source // 4], (200, 30, 30))
        image.save(path, quality=90)
        (folder / f"img_{index:04d}.txt").write_text(f"picture number {index}")
    return folder


def make_config(root: Path, model: Path, data: Path, family: str, size: int, batch: int) -> Any:
    from dittune.config.load import validate_config

    return validate_config(
        {
            "output_dir": str(root / "run"),
            "model": {"family": family, "path": str(model)},
            "data": {"path": str(data), "resolution": size, "resolution_type": "pixel", "random_flip": False},
            "train": {"method": "lora", "max_steps": 1, "batch_size": 1, "mixed_precision": "no", "trackers": []},
            "cache": {"dir": str(root / "cache"), "vae_batch_size": batch},
        }
    )


# ------------------------------------------------------------------------------------------ the two paths
def ours_round(cfg: Any, spec: Any, vae: torch.nn.Module, data: Path) -> Callable[[], int]:
    """A fresh latent cache (image fingerprints forgotten), then `prepare_data`; returns images encoded."""
    from dittune.train.prepare import prepare_data

    memo = cfg.cache_dir / "fingerprints.json"
    prefix = str(data.resolve())

    def reset() -> None:
        shutil.rmtree(cfg.cache_dir / "latents", ignore_errors=True)
        if memo.is_file():
            kept = {k: v for k, v in json.loads(memo.read_text()).items() if not k.startswith(prefix)}
            memo.write_text(json.dumps(kept))

    def run() -> int:
        prepared = prepare_data(
            cfg, spec, device=torch.device("cpu"), compute_dtype="fp32", get_vae=lambda: vae,
            progress=False, announce=lambda _: None,
        )  # fmt: skip
        return prepared.stats["latents"].misses

    run.reset = reset  # type: ignore[attr-defined]
    return run


def bare_round(plan: Any, vae: torch.nn.Module, batch: int) -> Callable[[], int]:
    """Load, resize and crop the same images, `vae.encode` them in `batch`-sized chunks, moments to the CPU."""
    from dittune.data.transforms import load_pixels

    samples = list(plan.samples)
    param = next(vae.parameters())

    def run() -> int:
        with torch.no_grad():
            for first in range(0, len(samples), batch):
                chunk = samples[first : first + batch]
                pixels = torch.stack([load_pixels(s.record.path, s.placement, False) for s in chunk])
                posterior = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
                posterior.mean.cpu(), posterior.logvar.cpu()
        return len(samples)

    run.reset = lambda: None  # type: ignore[attr-defined]
    return run


def timed(fn: Callable[[], int]) -> tuple[float, float]:
    """(images/s by wall time, images/s by process CPU time) of one call, after its untimed reset."""
    fn.reset()  # type: ignore[attr-defined]
    wall, cpu = time.perf_counter(), time.process_time()
    count = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return count / wall, count / cpu


PROFILE_PARTS = (
    ("prepare_data (ours, all)", "prepare.py", "prepare_data"),
    ("  plan: discover + buckets", "prepare.py", "plan_data"),
    ("  ensure_latents", "build.py", "ensure_latents"),
    ("    image fingerprints", "fingerprint.py", "file"),
    ("    cache lookups (contains)", "store.py", "contains"),
    ("    load + resize (load_pixels; 0 when it runs on loader threads)", "transforms.py", "load_pixels"),
    ("    waiting for loader threads", "_base.py", "result"),
    ("    VAE encode (encode_pixels)", "autoencoder.py", "encode_moments"),
    ("    writes (CacheStore.save; 0 when it runs on the writer thread)", "store.py", "save"),
    ("  text lookups (ensure_text_embeddings)", "build.py", "ensure_text_embeddings"),
)


def profile_ours(fn: Callable[[], int]) -> list[str]:
    fn.reset()  # type: ignore[attr-defined]
    profiler = cProfile.Profile()
    profiler.enable()
    count = fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    lines = ["", f"cProfile of one ours round ({count} images, main thread only), cumulative ms per image:", ""]
    lines += ["| part | ms/image |", "|---|---|"]
    for label, file, name in PROFILE_PARTS:
        total = sum(v[3] for (f, _, n), v in stats.items() if f.endswith(file) and n == name)
        lines.append(f"| {label} | {total * 1000 / max(count, 1):.2f} |")
    return lines


# ------------------------------------------------------------------------------------------ main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="hunyuan-dit")
    parser.add_argument("--vae", choices=sorted(VAES), default="small", help="VAE size (encoder widths in VAES)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=256, help="bucket side in pixels")
    parser.add_argument("--source", type=int, default=384, help="source image side (resized to the bucket)")
    parser.add_argument("--batch-size", type=int, default=4, help="cache.vae_batch_size and the bare batch")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's choice)")
    parser.add_argument("--workdir", type=Path, help="keep model and images here between runs")
    parser.add_argument("--profile", action="store_true", help="cProfile one ours round and attribute its time")
    parser.add_argument("--write", action="store_true", help="write results/cache_build-cpu.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dittune.models.registry import spec_class
    from dittune.train.prepare import plan_data, prepare_data

    root = args.workdir or Path(tempfile.mkdtemp(prefix="dittune-cache-build-"))
    try:
        model = build_model(root / "model" / f"{args.family}-{args.vae}", args.family, args.vae)
        data = build_dataset(root / f"data-{args.source}", args.images, args.source)
        cfg = make_config(root, model, data, args.family, args.size, args.batch_size)
        shutil.rmtree(cfg.cache_dir, ignore_errors=True)
        spec = spec_class(args.family)(model)
        vae = spec.load_vae(torch.device("cpu"), torch.float32)
        prepare_data(cfg, spec, device=torch.device("cpu"), compute_dtype="fp32", get_vae=lambda: vae,
                     progress=False, announce=lambda _: None)  # fmt: skip
        plan = plan_data(cfg, spec)
        paths = {"ours": ours_round(cfg, spec, vae, data), "bare": bare_round(plan, vae, args.batch_size)}
        for fn in paths.values():  # warm-up
            timed(fn)
        rates: dict[str, list[tuple[float, float]]] = {"ours": [], "bare": []}
        for index in range(args.rounds):
            for name in ("ours", "bare") if index % 2 == 0 else ("bare", "ours"):
                rates[name].append(timed(paths[name]))
        lines = report(args, rates, len(plan.samples))
        if args.profile:
            lines += profile_ours(paths["ours"])
        print("\n".join(lines))
        if args.write:
            write_results(args, lines)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    ratio = statistics.median(o[0] / b[0] for o, b in zip(rates["ours"], rates["bare"]))
    return 0 if ratio >= TARGET else 1


def report(args: argparse.Namespace, rates: dict[str, list[tuple[float, float]]], count: int) -> list[str]:
    ours, bare = rates["ours"], rates["bare"]
    per_round = [o[0] / b[0] for o, b in zip(ours, bare)]
    cpu_ratio = statistics.median(o[1] for o in ours) / statistics.median(b[1] for b in bare)
    threads = args.threads or torch.get_num_threads()
    disturbance = statistics.median(b[1] / b[0] for b in bare) * threads
    return [
        f"Cache build: {count} images {args.source} px → {args.size}² bucket, {args.family}, VAE `{args.vae}` "
        f"{VAES[args.vae]}, batch {args.batch_size}, fp32, {args.rounds} rounds",
        "",
        "| path | images/s (wall, median [min–max]) | images/s (CPU time) |",
        "|---|---|---|",
        *(
            f"| {name} | {statistics.median(r[0] for r in rs):.2f} [{min(r[0] for r in rs):.2f}–"
            f"{max(r[0] for r in rs):.2f}] | {statistics.median(r[1] for r in rs):.2f} |"
            for name, rs in (("ours (prepare_data)", ours), ("bare (load + vae.encode)", bare))
        ),
        "",
        f"**ratio ours ÷ bare (wall): {statistics.median(per_round):.3f}** "
        f"(per round [{min(per_round):.3f}–{max(per_round):.3f}]; target ≥ {TARGET})",
        f"ratio by CPU time: {cpu_ratio:.3f}",
        f"wall × threads ÷ CPU time of the bare path: {disturbance:.2f} (1.00: undisturbed)",
    ]


def write_results(args: argparse.Namespace, lines: list[str]) -> None:
    import sys

    command = "python benchmarks/cache_build.py " + shlex.join(sys.argv[1:])
    header = [
        "# cache_build (CPU)",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{args.threads or torch.get_num_threads()} torch thread(s)",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        "",
    ]
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "cache_build-cpu.md").write_text("\n".join([*header, *lines, ""]))


if __name__ == "__main__":
    raise SystemExit(main())
