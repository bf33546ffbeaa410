"""The demo base model: a tiny Hunyuan-DiT-architecture pipeline that has learned coloured shapes.

The recipe (run by `scripts/build_demo_base.py`):

1. `make_shapes_dataset` draws `BASE_SHAPES` × `BASE_COLOURS` on backgrounds of `BASE_COLOURS`, with
   captions alternating English and Chinese; the combinations in `held_out_combinations()` are never
   drawn, so the quality tests prompt for content the model has not seen as a whole;
2. `train_vae` trains a 4-block AutoencoderKL (×8) on random crops of those images;
3. `build_components` writes the pipeline folder: locally built tokenizers and random frozen text
   encoders (as `dittune tiny`), the trained VAE, a v1.2-style transformer config;
4. `dittune train` trains the transformer from a random initialisation (`train.init = "random"`,
   `train.method = "full"`) with `base_config_toml`.

Nothing here is hidden from the trainer: step 4 is an ordinary dittune run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dittune.precision import device_precision

BASE_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "black", "purple", "cyan")
BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
BASE_SIZES: tuple[tuple[int, int], ...] = ((80, 80), (128, 80), (80, 128), (96, 80), (80, 96))
"""Image sizes (width, height), all multiples of 16 with an 80-pixel short edge: no resizing at training."""
NEW_CONCEPT = "ring"
"""The shape word the base never sees; the quickstart LoRA teaches it."""

TRANSFORMER = {
    "num_layers": 6,
    "num_attention_heads": 6,
    "attention_head_dim": 32,
    "hidden_size": 192,
    "cross_attention_dim": 64,
    "cross_attention_dim_t5": 64,
    "pooled_projection_dim": 64,
    "mlp_ratio": 4.0,
    "sample_size": 16,
}
"""Overrides of the tiny transformer config (v1.2 style: no size/style conditioning)."""
BASE_LEARNING_RATE = 5e-4
"""AdamW learning rate of the base run (cosine decay after a short warm-up)."""
TEXT_HIDDEN = 64
VAE_CHANNELS = (32, 32, 32, 32)


def held_out_combinations(seed: int = 0, per_colour: int = 2) -> list[tuple[str, str, str]]:
    """(fill, shape, background) triples excluded from the base data: `per_colour` per fill colour.

    Every fill colour, shape and background still appears in training, only not in these triples.
    """
    rng = random.Random(seed)
    held = []
    for fill in BASE_COLOURS:
        options = [(fill, shape, bg) for shape in BASE_SHAPES for bg in BASE_COLOURS if bg != fill]
        held.extend(rng.sample(options, per_colour))
    return held


# ---------------------------------------------------------------------------------------- VAE
def tiny_vae(seed: int = 0):
    """The demo's AutoencoderKL: 4 blocks (×8), 4 latent channels, random weights."""
    from dittune.models.hunyuan_dit import tiny

    torch.manual_seed(seed)
    return tiny.tiny_vae(VAE_CHANNELS, norm_groups=16, scaling_factor=0.18215)


def _load_images(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(path).convert("RGB")) for path in sorted(folder.rglob("*.png"))]


def _random_crops(images: Sequence[np.ndarray], count: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    crops = []
    for index in rng.integers(0, len(images), count):
        image = images[index]
        top = rng.integers(0, image.shape[0] - size + 1)
        left = rng.integers(0, image.shape[1] - size + 1)
        crop = image[top : top + size, left : left + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crops.append(np.ascontiguousarray(crop))
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


def train_vae(
    data_dir: Path,
    steps: int,
    seed: int = 0,
    batch_size: int = 16,
    crop: int = 64,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-6,
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Train `tiny_vae` on random crops (L1 + `kl_weight` × KL, cosine LR), in bf16 autocast where this
    CPU computes bf16 natively, else fp32 (the rule of `train.mixed_precision = "auto"`).

    Sets `config.scaling_factor` to 1 / std of the latent means over the whole images, and returns
    the VAE with its final reconstruction numbers (and the precision, under "precision").
    """
    from tqdm.auto import tqdm

    images = _load_images(data_dir)
    if not images:
        raise ValueError(f"no PNG images in {data_dir}")
    vae = tiny_vae(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    precision = device_precision("auto", "cpu")
    vae.train()
    bar = tqdm(range(steps), desc="Training VAE", unit="step", disable=not progress)
    for _ in bar:
        pixels = _random_crops(images, batch_size, crop, rng)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.name == "bf16"):
            posterior = vae.encode(pixels).latent_dist
            latents = posterior.sample(generator)
            reconstruction = vae.decode(latents).sample
        l1 = (reconstruction.float() - pixels).abs().mean()
        loss = l1 + kl_weight * posterior.kl().float().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        bar.set_postfix(l1=f"{l1.item():.4f}")
    vae.eval()
    return vae, {**calibrate_vae(vae, images[:256]), "precision": precision.name}


@torch.no_grad()
def calibrate_vae(vae: Any, images: Sequence[np.ndarray]) -> dict[str, float]:
    """Set the scaling factor from the latent std and measure reconstruction error (fp32)."""
    means, errors = [], []
    for image in images:
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        mean = vae.encode(pixels).latent_dist.mean
        means.append(mean.flatten())
        errors.append((vae.decode(mean).sample.clamp(-1, 1) - pixels).abs().mean().item() * 127.5)
    std = torch.cat(means).std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return {
        "latent_std": std,
        "scaling_factor": vae.config.scaling_factor,
        "mean_abs_error_0_255": float(np.mean(errors)),
    }


# -------------------------------------------------------------------------------- pipeline parts
def build_components(out_dir: Path, vae: Any, seed: int = 0, readme: str | None = None) -> Path:
    """Write the untrained pipeline folder (trained VAE, random frozen text encoders, v1.2 config)."""
    from dittune.models.hunyuan_dit.tiny import build_tiny_hunyuan_dit

    return build_tiny_hunyuan_dit(
        out_dir,
        variant="v1.2",
        seed=seed,
        transformer_overrides=TRANSFORMER,
        text_hidden=TEXT_HIDDEN,
        vae=vae,
        readme=readme or "# Demo base components (transformer untrained)\n",
    )


def validation_prompts() -> list[str]:
    """Four held-out prompts, two English and two Chinese, for the base run's validation grids."""
    from dittune.demo.shapes import caption

    held = held_out_combinations()
    return [caption(*held[0]), caption(*held[5]), caption(*held[10], chinese=True), caption(*held[15], chinese=True)]


def base_config_toml(
    model: str, data: str, cache: str, output_dir: str, steps: int, seed: int = 0, validate_every: int = 1000
) -> str:
    """The `dittune train` config of the base run (paths relative to the config file)."""
    prompts = ", ".join(f'"{prompt}"' for prompt in validation_prompts())
    return f"""# The demo base run: full training from a random initialisation (see dittune/demo/base.py).
output_dir = "{output_dir}"

[model]
family = "hunyuan-dit"
path = "{model}"

[data]
path = "{data}"
resolution = 80
resolution_type = "pixel"
bucket_step = 16
max_aspect_ratio = 1.6

[train]
method = "full"
init = "random"
max_steps = {steps}
batch_size = 32
learning_rate = {BASE_LEARNING_RATE}
lr_scheduler = "cosine"
lr_warmup_steps = {min(200, steps // 10)}
weight_decay = 0.0
mixed_precision = "auto"       # bf16 where the CPU computes it natively, else fp32
caption_dropout = 0.1
seed = {seed}
log_every_steps = 10
trackers = ["tensorboard"]

[cache]
dir = "{cache}"
latent_sampling = "mode"
vae_batch_size = 32
text_batch_size = 64

[checkpoint]
every_steps = 500
keep_last = 1

[validation]
every_steps = {validate_every}
prompts = [{prompts}]
steps = 25
guidance = 4.0
"""
