"""Optimizer state per trainable parameter for every `train.optimizer`, and what `optimizer_offload` costs on CPU.

State: one optimizer step on random gradients, then `dittune.train.optim.state_bytes` (every tensor in the
optimizer's state; offloaded: plus the fp32 weight copies and gradient buffers) ÷ trainable parameters, on
(a) one 1024×1024 weight — the figure large models approach —, (b) the tiny Hunyuan-DiT v1.2 transformer
trained in full and (c) with LoRA rank 16 (small tensors: the 8-bit optimizers keep 32-bit states below
4096 elements).

Offload: the step time of `adamw` with and without `optimizer_offload` on CPU weights (where offloading is
only copies), in alternating rounds on one thread. Run `python benchmarks/optimizer_state.py [--write]`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from dittune.config.schema import TrainSection
from dittune.train.optim import build_optimizer, set_optimizer_mode, state_bytes

OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit", "adafactor", "prodigy", "schedulefree_adamw")
RESULTS = Path(__file__).parent / "results" / "optimizer_state-cpu.md"


def _models() -> dict[str, list[torch.nn.Parameter]]:
    from diffusers import HunyuanDiT2DModel

    from dittune.models.hunyuan_dit.tiny import tiny_transformer_config
    from dittune.models.lora import inject_lora, lora_parameters

    torch.manual_seed(0)
    full = HunyuanDiT2DModel(**tiny_transformer_config("v1.2"))
    lora = HunyuanDiT2DModel(**tiny_transformer_config("v1.2")).requires_grad_(False)
    inject_lora(lora, rank=16, alpha=16.0, targets=["to_q", "to_k", "to_v", "to_out.0"], dropout=0.0)
    return {
        "1024×1024 weight": [torch.nn.Parameter(torch.randn(1024, 1024) * 0.02)],
        "tiny Hunyuan-DiT, full": list(full.parameters()),
        "tiny Hunyuan-DiT, LoRA r16": lora_parameters(lora),
    }


def _per_param(params: list[torch.nn.Parameter], name: str, offload: bool) -> float:
    optimizer = build_optimizer(params, TrainSection(max_steps=1, optimizer=name, optimizer_offload=offload))
    set_optimizer_mode(optimizer, training=True)
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()
    for param in params:
        param.grad = None
    return sum(state_bytes(optimizer).values()) / sum(p.numel() for p in params)


def _offload_ratio(rounds: int, size: int) -> tuple[float, float, float]:
    """(median plain step ms, median offloaded step ms, ratio) for 4 weights of size × size."""
    times: dict[bool, list[float]] = {False: [], True: []}
    runs = {}
    for offload in (False, True):
        params = [torch.nn.Parameter(torch.randn(size, size) * 0.02) for _ in range(4)]
        runs[offload] = (params, build_optimizer(params, TrainSection(max_steps=1, optimizer_offload=offload)))
    for index in range(rounds):
        for offload in (False, True) if index % 2 else (True, False):
            params, optimizer = runs[offload]
            for param in params:
                param.grad = torch.full_like(param, 1e-3)
            started = time.perf_counter()
            optimizer.step()
            times[offload].append(time.perf_counter() - started)
    plain, offloaded = statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3
    return plain, offloaded, offloaded / plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per variant (offload cost)")
    parser.add_argument("--size", type=int, default=2048, help="side of the 4 square weights timed")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/optimizer_state-cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = _models()
    lines = [
        "Optimizer state, bytes per trainable parameter (CPU, fp32 weights; offloaded: + CPU weight copy and "
        "gradient buffer)",
        "",
        "| optimizer | " + " | ".join(models) + " | offloaded, 1024×1024 |",
        "| --- |" + " --- |" * (len(models) + 1),
    ]
    for name in OPTIMIZERS:
        cells = [f"{_per_param(params, name, offload=False):.2f}" for params in models.values()]
        cells.append(f"{_per_param(models['1024×1024 weight'], name, offload=True):.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    plain, offloaded, ratio = _offload_ratio(args.rounds, args.size)
    params = 4 * args.size * args.size / 1e6
    lines += [
        "",
        f"adamw step on CPU, {params:.1f} M parameters, one thread: {plain:.1f} ms plain, {offloaded:.1f} ms with "
        f"optimizer_offload (×{ratio:.2f}: the two copies on a CPU-only machine)",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        header = (
            f"# optimizer_state.py on CPU\n\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{dt.date.today()}\n\n`{shlex.join([Path(sys.executable).name, *sys.argv])}`\n\n"
        )
        RESULTS.write_text(header + text + "\n")


if __name__ == "__main__":
    main()
