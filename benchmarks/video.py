"""Video: caching throughput and the training step against their bare lower bounds, in one run (HunyuanVideo).

Cache — "ours" is `dittune.train.prepare.prepare_data` on a folder of clips (what `dittune cache` runs):
probing, planning, fingerprints, keys, PyAV decoding of the chosen frames, resizing, `spec.encode_pixels` one
clip at a time, atomic writes; the latent entries and the clips' fingerprint memo are dropped before each round.
"bare" decodes the same frames with PyAV, resizes and crops them with the same function and calls
`vae.encode` on each clip; nothing is written. Figure of merit: clips/s ours ÷ bare (target ≥ 0.9).

Step — "ours" is `Trainer.optimizer_step` (+ the metrics line) on the cached clips; "bare" is forward → MSE
→ backward → optimizer step of the same transformer on one fixed batch with every input precomputed.
Figure of merit: ms/step ours ÷ bare (target ≤ 1.10).

Rounds alternate the order of ours and bare. Run `python benchmarks/video.py --help`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from trainer_overhead import machine_line, quiet, synchronize, with_larger_transformer, write_results

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FAMILY = "hunyuan-video"


def transformer_config(heads: int, layers: int) -> dict[str, Any]:
    """HunyuanVideoTransformer3DModel with 64-dim heads, text widths of the tiny encoders (32)."""
    return {
        "in_channels": 4, "out_channels": 4, "num_attention_heads": heads, "attention_head_dim": 64,
        "num_layers": layers, "num_single_layers": layers, "num_refiner_layers": 1, "mlp_ratio": 4.0,
        "patch_size": 2, "patch_size_t": 1, "guidance_embeds": True, "text_embed_dim": 32,
        "pooled_projection_dim": 32, "rope_axes_dim": (16, 24, 24),
    }  # fmt: skip


def with_larger_vae(folder: Path, widths: tuple[int, ...]) -> None:
    """Replace the tiny pipeline's VAE by an `AutoencoderKLHunyuanVideo` of `widths` (same latent layout)."""
    from diffusers import AutoencoderKLHunyuanVideo

    config = json.loads((folder / "vae" / "config.json").read_text())
    if tuple(config["block_out_channels"]) == widths:
        return
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=config["latent_channels"], block_out_channels=widths, layers_per_block=1,
        norm_num_groups=8, scaling_factor=config["scaling_factor"],
    )  # fmt: skip
    shutil.rmtree(folder / "vae")
    vae.save_pretrained(folder / "vae", safe_serialization=True)


def build_clips(folder: Path, count: int, frames: int, side: int) -> Path:
    import numpy as np
    from PIL import Image, ImageDraw

    from dittune.media import write_frames

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        path = folder / f"clip_{index:03d}.mp4"
        if path.is_file():
            continue
        images = []
        for frame in range(frames):
            image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
            x = side // 8 + frame * side // (2 * frames)
            ImageDraw.Draw(image).ellipse([x, side // 4, x + side // 3, side // 4 + side // 3], (220, 30, 30))
            images.append(image)
        write_frames(images, path, 24)
        (folder / f"clip_{index:03d}.txt").write_text(f"clip number {index}: a red ball rolling")
    return folder


def make_config(root: Path, model: Path, data: Path, args: Any, method: str = "lora") -> Any:
    from dittune.config.load import validate_config

    return validate_config(
        {
            "output_dir": str(root / "runs" / method),
            "model": {"family": FAMILY, "path": str(model)},
            "data": {"path": str(data), "resolution": args.size, "resolution_type": "pixel", "frames": args.frames},
            "train": {"method": method, "max_steps": 10**6, "batch_size": 1, "mixed_precision": args.precision,
                      "trackers": [], "log_every_steps": 1},
            "cache": {"dir": str(root / "cache")},
            "checkpoint": {"every_steps": 10**6},
        }
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ cache
def cache_paths(cfg: Any, data: Path) -> tuple[Callable[[], int], Callable[[], int]]:
    from dittune.data.transforms import pixels_from_image
    from dittune.data.video import decode_frames
    from dittune.train.prepare import plan_data, prepare_data
    from dittune.train.setup import load_spec

    spec, _ = load_spec(cfg)
    vae = spec.load_vae(torch.device("cpu"), torch.float32)
    plan = plan_data(cfg, spec)
    memo = cfg.cache_dir / "fingerprints.json"

    def ours() -> int:
        shutil.rmtree(cfg.cache_dir / "latents", ignore_errors=True)
        if memo.is_file():
            kept = {k: v for k, v in json.loads(memo.read_text()).items() if not k.startswith(str(data.resolve()))}
            memo.write_text(json.dumps(kept))
        prepared = prepare_data(
            cfg, spec, device=torch.device("cpu"), compute_dtype="fp32", get_vae=lambda: vae,
            progress=False, announce=lambda _: None,
        )  # fmt: skip
        return prepared.stats["latents"].misses

    def bare() -> int:
        with torch.no_grad():
            for sample in plan.samples:
                placement = sample.placement
                frames = decode_frames(sample.record.path, placement.frame_indices)
                clip = torch.stack([pixels_from_image(f, placement, False) for f in frames], dim=1)
                posterior = vae.encode(clip.unsqueeze(0)).latent_dist
                posterior.mean.cpu(), posterior.logvar.cpu()
        return len(plan.samples)

    return ours, bare


# ------------------------------------------------------------------------------------------ step
def step_paths(cfg: Any) -> tuple[Callable[[], None], Callable[[], None], Any]:
    from dittune.train.runner import check
    from dittune.train.setup import build_run, make_accelerator
    from dittune.train.trainer import Trainer

    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    check(cfg)
    cfg.output_dir.mkdir(parents=True)
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
    x0 = run.spec.latents_from_moments(batch.moments, generator, sample=False)
    x_t = 0.6 * x0 + 0.8 * torch.randn(x0.shape, generator=generator)
    sigmas = torch.full((x0.shape[0],), 0.5)
    target = torch.randn(x0.shape, generator=generator)
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)

    def bare() -> None:
        with run.accelerator.autocast():
            out = run.spec.forward(run.denoiser, x_t, sigmas, batch.text)
        torch.nn.functional.mse_loss(out.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return ours, bare, run


def alternate(ours: Callable, bare: Callable, rounds: int, log: Callable[[str], None], what: str) -> tuple[list, list]:
    """Seconds per call of each path over `rounds` alternating rounds (after one untimed call of each)."""
    ours(), bare()
    times: tuple[list[float], list[float]] = ([], [])
    for index in range(rounds):
        for which in (0, 1) if index % 2 == 0 else (1, 0):
            synchronize(torch.device("cpu"))
            started = time.perf_counter()
            (ours, bare)[which]()
            times[which].append(time.perf_counter() - started)
        log(f"  {what} round {index + 1}/{rounds}: ours {times[0][-1]:.3f} s, bare {times[1][-1]:.3f} s")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--frames", type=int, default=17, help="frames per clip (4k+1)")
    parser.add_argument("--size", type=int, default=128, help="clip side in pixels")
    parser.add_argument("--heads", type=int, default=4, help="transformer heads of 64 dims")
    parser.add_argument("--layers", type=int, default=2, help="double- and single-stream blocks each")
    parser.add_argument("--vae", default="32,64,64,64", help="VAE block widths")
    parser.add_argument("--precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/video-cpu.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="dittune-video-bench-"))
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    model = with_larger_transformer(root / "model", FAMILY, "t2v", transformer_config(args.heads, args.layers))
    with_larger_vae(model, tuple(int(w) for w in args.vae.split(",")))
    data = build_clips(root / "clips", args.clips, args.frames, args.size)
    cfg = make_config(root, model, data, args)

    cache_ours, cache_bare = cache_paths(cfg, data)
    cache_times = alternate(cache_ours, cache_bare, args.rounds, log, "cache")
    cache_rate = [args.clips / statistics.median(t) for t in cache_times]
    step_ours, step_bare, run = step_paths(cfg)
    step_times = alternate(step_ours, step_bare, args.rounds * 3, log, "step")
    step_ms = [1000 * statistics.median(t) for t in step_times]

    capability = torch.backends.cpu.get_cpu_capability()
    params = sum(p.numel() for n, p in run.denoiser.named_parameters() if ".lora_" not in n)
    report = [
        "# Video benchmark (HunyuanVideo, CPU)",
        "",
        f"Machine: {machine_line(torch.device('cpu'))}; CPU capability {capability}; precision {args.precision}.",
        f"Workload: {args.clips} clips of {args.frames} frames at {args.size}×{args.size} (H.264), VAE widths "
        f"{args.vae}; transformer {args.heads}×64 heads, {args.layers}+{args.layers} blocks, {params / 1e6:.1f} M "
        f"parameters, LoRA rank {cfg.lora.rank}; {args.rounds} cache rounds, {args.rounds * 3} step rounds.",
        "",
        "| measurement | ours | bare | ratio | target |",
        "|---|---:|---:|---:|---|",
        f"| cache clips/s | {cache_rate[0]:.2f} | {cache_rate[1]:.2f} "
        f"| **{cache_rate[0] / cache_rate[1]:.3f}** | ≥ 0.9 |",
        f"| step ms | {step_ms[0]:.1f} | {step_ms[1]:.1f} | **{step_ms[0] / step_ms[1]:.3f}** | ≤ 1.10 |",
        "",
        "Command: `python benchmarks/video.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
    ]
    print("\n".join(report))
    if args.write:
        write_results(
            RESULTS_DIR / "video-cpu.md", "\n".join(report) + "\n\n## Log\n\n```\n" + "\n".join(lines) + "\n```\n"
        )
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
