"""Multi-GPU check of every launch in examples/accelerate/ (needs ≥ 2 CUDA GPUs; nothing here runs on a CPU).

For a tiny SD3 (built offline) on 8 generated images, LoRA and full fine-tuning, fp32: one process with batch 4
is the reference; each accelerate config (DDP, FSDP2, DeepSpeed ZeRO-2/3 with and without offload) trains with
2 processes × batch 2 and must end with the same weights (dittune keys every random draw by sample, so the split
does not matter). Each launch also resumes from its step-2 checkpoint and must end where it ended uninterrupted.
Prints a markdown table and writes it to benchmarks/results/multi_gpu-cuda.md.

    python benchmarks/multi_gpu.py [--workdir DIR] [--configs ddp fsdp2 ...]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3", "deepspeed_zero3_offload"]


def dataset(root: Path) -> Path:
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    for index, colour in enumerate(["red", "blue", "green", "yellow"] * 2):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse([8 + 4 * index, 16, 40 + 4 * index, 48], colour)
        image.save(root / f"{index}.png")
        (root / f"{index}.txt").write_text(f"a {colour} circle")
    return root


def config(path: Path, model: Path, data: Path, out: Path, method: str, batch: int) -> Path:
    path.write_text(
        f'output_dir = "{out}"\n[model]\nfamily = "sd3"\npath = "{model}"\n'
        f'[data]\npath = "{data}"\nresolution = 64\nresolution_type = "pixel"\nrandom_flip = true\n'
        f'[train]\nmethod = "{method}"\nmax_steps = 4\nbatch_size = {batch}\nmixed_precision = "no"\n'
        "learning_rate = 1e-3\ncaption_dropout = 0.3\ntrackers = []\n"
        f'[cache]\ndir = "{out.parent / "cache"}"\n[checkpoint]\nevery_steps = 2\nkeep_last = 5\n'
    )
    return path


def weights(run: Path, method: str) -> dict:
    from safetensors.torch import load_file

    if method == "lora":
        return load_file(run / "final" / "lora.safetensors")
    return load_file(next((run / "final" / "transformer").glob("*.safetensors")))


def difference(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dittune-multi-gpu"))
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    args = parser.parse_args()
    import torch

    if torch.cuda.device_count() < 2:
        print(f"error: this check needs at least 2 CUDA GPUs (found {torch.cuda.device_count()})")
        return 1
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    model, data = work / "sd3", dataset(work / "data")
    subprocess.run([sys.executable, "-m", "dittune", "tiny", "sd3", str(model)], check=True)
    rows = ["| launch | method | max difference to 1 × 4 | resumed vs uninterrupted |", "| --- | --- | --- | --- |"]
    for method in ("lora", "full"):
        reference = work / f"{method}-reference"
        cfg = config(work / f"{method}-reference.toml", model, data, reference, method, 4)
        subprocess.run([sys.executable, "-m", "dittune", "train", str(cfg)], check=True)
        for name in args.configs:
            out = work / f"{method}-{name}"
            cfg = config(work / f"{method}-{name}.toml", model, data, out, method, 2)
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
            launch += [str(REPO / "examples" / "accelerate" / f"{name}.yaml"), "--num_processes", "2"]
            result = subprocess.run([*launch, "-m", "dittune", "train", str(cfg)])
            if result.returncode:
                rows.append(f"| {name} | {method} | failed (exit {result.returncode}) | – |")
                continue
            resumed = work / f"{method}-{name}-resumed"
            shutil.copytree(out / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
            again = [
                *launch,
                "-m",
                "dittune",
                "train",
                str(cfg),
                "--set",
                f"output_dir={resumed}",
                "--resume",
                "latest",
            ]
            result = subprocess.run(again)
            resume = difference(weights(out, method), weights(resumed, method)) if not result.returncode else "failed"
            split = difference(weights(reference, method), weights(out, method))
            rows.append(
                f"| {name} | {method} | {split:.3g} | {resume if isinstance(resume, str) else f'{resume:.3g}'} |"
            )
    table = "\n".join(rows)
    print(table)
    results = REPO / "benchmarks" / "results" / "multi_gpu-cuda.md"
    results.write_text(
        f"# Multi-GPU launches ({torch.cuda.get_device_name(0)}, torch {torch.__version__})\n\n{table}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
