"""Measure what the demo models do: prompt-following colour accuracy and the new concept's rate.

Images come from the family's stock pipeline (through its model spec, as `dittune sample`), one CPU
generator per image seeded with the job's seed, and are read with `dittune.demo.measure`.

    python -m dittune.demo.evaluate demo/base [--lora LORA] [--grid OUT.png]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from dittune.demo.measure import ShapeReading, read_shape
from dittune.demo.shapes import RGB, caption

EVAL_SEEDS: tuple[int, ...] = (1000, 1001, 1002)
"""Seeds for evaluation, disjoint from every seed used in training and validation."""
EVAL_SIZES: tuple[tuple[int, int], ...] = ((80, 80), (128, 80), (80, 128))
EVAL_STEPS = 25
EVAL_GUIDANCE = 4.0


@dataclass(frozen=True)
class Job:
    fill: str
    shape: str
    background: str
    chinese: bool
    seed: int
    width: int
    height: int

    @property
    def prompt(self) -> str:
        return caption(self.fill, self.shape, self.background, chinese=self.chinese)


@dataclass(frozen=True)
class Result:
    job: Job
    reading: ShapeReading

    @property
    def colour_correct(self) -> bool:
        return self.reading.colour == self.job.fill


def jobs_for(
    combinations: Sequence[tuple[str, str, str]],
    seeds: Sequence[int] = EVAL_SEEDS,
    languages: Sequence[bool] = (False, True),
) -> list[Job]:
    """Every combination × language × seed; sizes cycle through `EVAL_SIZES` across seeds."""
    jobs = []
    for fill, shape, background in combinations:
        for chinese in languages:
            for index, seed in enumerate(seeds):
                width, height = EVAL_SIZES[index % len(EVAL_SIZES)]
                jobs.append(Job(fill, shape, background, chinese, seed, width, height))
    return jobs


def load_pipeline(model: Path, lora: Path | None = None, lora_scale: float = 1.0):
    """(spec, pipeline) on CPU in fp32, with a dittune LoRA loaded if given."""
    from dittune.models.registry import detect_family, spec_class

    spec = spec_class(detect_family(model))(model)
    pipeline = spec.load_pipeline(torch.float32)
    if lora is not None:
        from dittune.lora import load_lora

        load_lora(pipeline, lora, scale=lora_scale)
    return spec, pipeline


@torch.no_grad()
def generate(
    spec, pipeline, jobs: Sequence[Job], steps: int = EVAL_STEPS, guidance: float = EVAL_GUIDANCE, batch_size: int = 24
) -> list[Image.Image]:
    """One image per job, batched by size; each image's noise comes from its own seeded generator."""
    images: dict[int, Image.Image] = {}
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, job in enumerate(jobs):
        by_size.setdefault((job.width, job.height), []).append(index)
    for (width, height), indices in by_size.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            kwargs = spec.prompt_kwargs("", "", width=width, height=height)
            kwargs["prompt"] = [jobs[i].prompt for i in chunk]
            kwargs["negative_prompt"] = [""] * len(chunk)
            generators = [torch.Generator("cpu").manual_seed(jobs[i].seed) for i in chunk]
            output = pipeline(**kwargs, num_inference_steps=steps, guidance_scale=guidance, generator=generators)
            images.update(zip(chunk, output.images))
    return [images[i] for i in range(len(jobs))]


def measure(images: Sequence[Image.Image], jobs: Sequence[Job]) -> list[Result]:
    """Read every image against the demo palette (`BASE_COLOURS`: the colours the models know)."""
    from dittune.demo.base import BASE_COLOURS

    palette = {name: RGB[name] for name in BASE_COLOURS}
    return [Result(job, read_shape(image, palette)) for job, image in zip(jobs, images)]


def summarise(results: Sequence[Result]) -> dict[str, float]:
    """Colour accuracy overall and per language, and the hollow rate (fractions of 1)."""

    def rate(items: Sequence[Result], predicate) -> float:
        return sum(map(predicate, items)) / len(items) if items else float("nan")

    def correct(result: Result) -> bool:
        return result.colour_correct

    english = [r for r in results if not r.job.chinese]
    chinese = [r for r in results if r.job.chinese]
    return {
        "samples": len(results),
        "colour_accuracy": rate(results, correct),
        "colour_accuracy_en": rate(english, correct),
        "colour_accuracy_zh": rate(chinese, correct),
        "hollow_rate": rate(results, lambda result: result.reading.hollow),
    }


def results_grid(images: Sequence[Image.Image], results: Sequence[Result], columns: int = 12) -> Image.Image:
    """The evaluated images with ✓/✗ labels (prompt colour → read colour)."""
    from dittune.validate.runner import make_grid

    labelled = []
    for image, result in zip(images, results):
        mark = "ok" if result.colour_correct else "x"
        hollow = " hollow" if result.reading.hollow else ""
        labelled.append((f"{mark} {result.job.fill}->{result.reading.colour}{hollow}", image))
    return make_grid(labelled, columns=columns, min_tile=96)


def main(argv: Sequence[str] | None = None) -> int:
    from dittune.demo.base import NEW_CONCEPT, held_out_combinations

    parser = argparse.ArgumentParser(prog="python -m dittune.demo.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--lora", type=Path)
    parser.add_argument(
        "--concept", action="store_true", help=f"evaluate {NEW_CONCEPT!r} prompts instead of held-out colours"
    )
    parser.add_argument("--grid", type=Path, help="also save the evaluated images as a labelled grid")
    parser.add_argument("--json", type=Path, help="write the summary as JSON")
    args = parser.parse_args(argv)
    from dittune.demo.quickstart import concept_eval_combinations

    combinations = concept_eval_combinations() if args.concept else held_out_combinations()
    jobs = jobs_for(combinations)
    spec, pipeline = load_pipeline(args.model, args.lora)
    images = generate(spec, pipeline, jobs)
    results = measure(images, jobs)
    summary = summarise(results)
    if args.grid:
        results_grid(images, results).save(args.grid)
    if args.json:
        args.json.write_text(
            json.dumps({"summary": summary, "results": [asdict(r.job) | asdict(r.reading) for r in results]}, indent=1)
        )
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
