"""The quickstart: teach the demo base (`demo/base`) a shape word it has never seen with a LoRA.

    python -m dittune.demo.quickstart OUT_DIR [--base demo/base] [--steps 500] [--seed 0]

1. draws `--images` rings ("a red ring on a blue background" / "蓝色背景上的红色圆环"), leaving out
   the combinations of `concept_eval_combinations()`;
2. writes OUT_DIR/config.toml and runs `dittune train` on it (validation grids before and after);
3. writes OUT_DIR/before_after.png (the step-0 and final validation grids) and the run's loss.png;
4. measures the base and the LoRA on held-out ring prompts × English/Chinese × held-out seeds: the
   rate of hollow shapes (`dittune.demo.measure`), and colour accuracy — into OUT_DIR/summary.json.

Everything is a pure function of the seed: the same command gives the same LoRA and numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from dittune.demo.base import BASE_COLOURS, BASE_SIZES, NEW_CONCEPT, held_out_combinations
from dittune.demo.shapes import caption, make_shapes_dataset

REPO_BASE = Path(__file__).resolve().parents[3] / "demo" / "base"
"""The committed base model, when running from a checkout."""
DEFAULT_STEPS = 500
DEFAULT_IMAGES = 64


def concept_eval_combinations(seed: int = 1) -> list[tuple[str, str, str]]:
    """One (fill, ring, background) combination per base colour, kept out of the LoRA's data."""
    rng = random.Random(seed)
    return [(fill, NEW_CONCEPT, rng.choice([c for c in BASE_COLOURS if c != fill])) for fill in BASE_COLOURS]


def make_concept_dataset(out_dir: Path, count: int = DEFAULT_IMAGES, seed: int = 0) -> Path:
    return make_shapes_dataset(
        out_dir, count, seed + 7, BASE_SIZES, (NEW_CONCEPT,), BASE_COLOURS, bilingual=True,
        exclude=concept_eval_combinations(),
    )  # fmt: skip


def validation_prompts() -> list[str]:
    """Four held-out ring prompts (English and Chinese) and two held-out base prompts."""
    rings = concept_eval_combinations()
    held = held_out_combinations()
    return [
        caption(*rings[0]), caption(*rings[3]), caption(*rings[5], chinese=True), caption(*rings[6], chinese=True),
        caption(*held[2]), caption(*held[9], chinese=True),
    ]  # fmt: skip


def config_toml(base: Path, steps: int = DEFAULT_STEPS, seed: int = 0, rank: int = 16) -> str:
    prompts = ",\n    ".join(json.dumps(p, ensure_ascii=False) for p in validation_prompts())
    return f"""# Written by `python -m dittune.demo.quickstart`. Paths are relative to this file's folder.
# Every option: `dittune config docs`. Check a config: `dittune config check config.toml`.
output_dir = "run"

[model]
family = "hunyuan-dit"
path = {json.dumps(str(base))}

[data]
path = "data"                  # rings with English/Chinese captions
resolution = 80                # short edge in pixels
resolution_type = "pixel"
bucket_step = 16
max_aspect_ratio = 1.6

[train]
method = "lora"
max_steps = {steps}
batch_size = 8
learning_rate = 1e-3
lr_scheduler = "cosine"
lr_warmup_steps = 20
mixed_precision = "auto"       # bf16 where the CPU computes it natively, else fp32
caption_dropout = 0.1
seed = {seed}
log_every_steps = 5
trackers = ["tensorboard"]

[lora]
rank = {rank}
targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]

[cache]
dir = "cache"                  # outside run/, so a re-run reuses it
latent_sampling = "mode"

[checkpoint]
every_steps = {max(1, steps // 2)}
keep_last = 1

[validation]
every_steps = {max(1, steps // 3)}           # plus step 0 (before) and the end (after)
prompts = [
    {prompts},
]
steps = 25
guidance = 4.0
"""


def _label(image: Image.Image, text: str) -> Image.Image:
    banner = 22
    out = Image.new("RGB", (image.width, image.height + banner), "white")
    out.paste(image.convert("RGB"), (0, banner))
    ImageDraw.Draw(out).text((6, 5), text, fill="black")
    return out


def before_after(run_dir: Path, out: Path) -> Path:
    """Stack the first (before training) and last validation grids of a run, labelled."""
    steps = sorted((run_dir / "validation").glob("step_*/grid.png"))
    if len(steps) < 2:
        raise FileNotFoundError(f"{run_dir / 'validation'} needs at least two validation grids")
    first, last = steps[0], steps[-1]
    before = _label(Image.open(first), f"before: base model ({first.parent.name})")
    after = _label(Image.open(last), f"after: base + LoRA ({last.parent.name})")
    canvas = Image.new("RGB", (max(before.width, after.width), before.height + after.height + 8), "white")
    canvas.paste(before, (0, 0))
    canvas.paste(after, (0, before.height + 8))
    canvas.save(out)
    return out


def measure_concept(base: Path, lora: Path | None, grid: Path | None = None) -> dict[str, float]:
    """Hollow rate and colour accuracy on held-out ring prompts × languages × evaluation seeds."""
    from dittune.demo.evaluate import generate, jobs_for, load_pipeline, measure, results_grid, summarise

    jobs = jobs_for(concept_eval_combinations())
    spec, pipeline = load_pipeline(base, lora)
    images = generate(spec, pipeline, jobs)
    results = measure(images, jobs)
    if grid is not None:
        results_grid(images, results).save(grid)
    return summarise(results)


def run_quickstart(out_dir: Path, base: Path, steps: int, seed: int, images: int) -> dict:
    """Data, config, `dittune train`, before/after image and measurements; returns the summary."""
    from dittune.cli.main import main as dittune_main

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (Path(base) / "model_index.json").is_file():
        raise FileNotFoundError(f"{base} is not a pipeline folder (model_index.json missing); pass --base")
    make_concept_dataset(out_dir / "data", images, seed)
    config = out_dir / "config.toml"
    config.write_text(config_toml(Path(base).resolve(), steps, seed), encoding="utf-8")
    run = out_dir / "run"
    if run.exists():
        shutil.rmtree(run)
    code = dittune_main(["train", str(config)])
    if code:
        raise RuntimeError(f"dittune train exited with {code}")
    before_after(run, out_dir / "before_after.png")
    lora = run / "final" / "lora.safetensors"
    summary = {
        "base": measure_concept(Path(base), None, out_dir / "eval_base.png"),
        "lora": measure_concept(Path(base), lora, out_dir / "eval_lora.png"),
        "steps": steps,
        "seed": seed,
        "images": images,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dittune.demo.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--base", type=Path, default=REPO_BASE, help="the demo base model (default: demo/base)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = run_quickstart(args.out_dir, args.base, args.steps, args.seed, args.images)
    base, lora = summary["base"], summary["lora"]
    print(f"\nHeld-out '{NEW_CONCEPT}' prompts ({base['samples']} images each, English and Chinese):")
    print(f"  hollow shapes    base {base['hollow_rate']:.0%}  ->  LoRA {lora['hollow_rate']:.0%}")
    print(f"  colour accuracy  base {base['colour_accuracy']:.0%}  ->  LoRA {lora['colour_accuracy']:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
