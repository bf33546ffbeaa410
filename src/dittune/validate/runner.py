"""Validation samples: the family's stock pipeline around the live model, fed from the text cache.

Outputs go to OUTPUT_DIR/validation/step_NNNNNNNN/: per prompt one PNG (image families) or an MP4 plus a
PNG strip of its frames (video families), grid.png (the images or strips, labelled) and prompts.txt (one
"NN<tab>prompt" line per sample). A failing prompt is logged with its text and reported; it never stops
training.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from dittune.models.base import ModelSpec, TextEmbedding

log = logging.getLogger(__name__)

CJK_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/msyh.ttc",
)
"""Fonts tried for labels outside Latin script (DITTUNE_LABEL_FONT, a font file, is tried first)."""


@dataclass
class ValidationRequest:
    prompts: Sequence[str]
    positive: Sequence[TextEmbedding]
    negative: TextEmbedding
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    frames: int = 1
    fps: float | None = None
    images: Sequence[Any] | None = None
    """Conditioning images (PIL), one per prompt, for image-to-video sampling."""
    extra: Sequence[dict[str, Any]] | None = None
    """More pipeline arguments per prompt (e.g. a ControlNet's control image)."""


@dataclass
class ValidationResult:
    images: list[Path] = field(default_factory=list)
    """The PNG per prompt (for a clip, the strip of its frames)."""
    clips: list[Path] = field(default_factory=list)
    """The MP4 per prompt (video families)."""
    grid: Path | None = None
    errors: list[str] = field(default_factory=list)


def slug(text: str, limit: int = 40) -> str:
    cleaned = re.sub(r"[\W_]+", "-", text).strip("-").lower()  # \w is Unicode-aware: Chinese prompts keep their words
    return cleaned[:limit] or "prompt"


def run_validation(
    spec: ModelSpec,
    pipeline: Any,
    request: ValidationRequest,
    out_dir: Path,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> ValidationResult:
    """Sample one image or clip per prompt (seed + i on a CPU generator) and write the files and a grid."""
    from dittune.media import strip, write_frames

    out_dir.mkdir(parents=True, exist_ok=True)
    result = ValidationResult()
    images: list[tuple[str, Image.Image]] = []
    fps = request.fps or spec.default_fps
    for index, (prompt, positive) in enumerate(zip(request.prompts, request.positive)):
        generator = torch.Generator("cpu").manual_seed(request.seed + index)
        try:
            kwargs = spec.pipeline_kwargs(
                positive,
                request.negative,
                width=request.width,
                height=request.height,
                steps=request.steps,
                guidance=request.guidance,
                generator=generator,
                frames=request.frames,
                fps=fps,
                image=request.images[index] if request.images else None,
            )
            kwargs.update(request.extra[index] if request.extra else {})
            with torch.no_grad(), autocast(), torch.random.fork_rng(devices=[]):
                # ControlNet pipelines draw their control latents from the global generator: seeded per prompt,
                # so validation repeats (forked: training's own random state is untouched)
                torch.manual_seed(request.seed + index)
                frames = spec.output_frames(pipeline(**kwargs))
        except Exception as error:  # validation must never stop training
            message = f"validation prompt {index} ({prompt!r}) failed: {type(error).__name__}: {error}"
            log.error(message)
            result.errors.append(message)
            continue
        stem = out_dir / f"{index:02d}-{slug(prompt)}"
        if len(frames) > 1:
            result.clips.append(write_frames(frames, stem.with_suffix(".mp4"), fps))
        result.images.append(write_frames(frames, stem.with_suffix(".png"), fps))
        images.append((f"{index:02d} {prompt}", frames[0] if len(frames) == 1 else strip(frames)))
    (out_dir / "prompts.txt").write_text("".join(f"{i:02d}\t{p}\n" for i, p in enumerate(request.prompts)), "utf-8")
    if images:
        result.grid = out_dir / "grid.png"
        make_grid(images, columns=1 if result.clips else 4).save(result.grid)
    return result


def _label_font(text: str) -> tuple[Any, str]:
    """(font, label): the default font for Latin text; for other scripts a system font that has them,
    else the label shortened to its leading number (the full prompt is in prompts.txt)."""
    default = ImageFont.load_default()
    if all(ord(ch) < 0x2E80 for ch in text):
        return default, text
    for candidate in (os.environ.get("DITTUNE_LABEL_FONT"), *CJK_FONTS):
        if candidate and Path(candidate).is_file():
            try:
                return ImageFont.truetype(candidate, 11), text
            except OSError:
                continue
    head = text.split(" ", 1)[0]
    return default, (f"{head} (see prompts.txt)" if head.isdigit() else "(see prompts.txt)")


def make_grid(images: Sequence[tuple[str, Image.Image]], columns: int = 4, min_tile: int = 256) -> Image.Image:
    """Images side by side with their prompt written underneath; small images are enlarged (nearest)."""
    scale = max(1, min_tile // max(img.width for _, img in images))
    images = [(prompt, img.resize((img.width * scale, img.height * scale), Image.NEAREST)) for prompt, img in images]
    width = max(img.width for _, img in images)
    height = max(img.height for _, img in images)
    label = 14
    columns = min(columns, len(images))
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * (height + label)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (prompt, image) in enumerate(images):
        x, y = (i % columns) * width, (i // columns) * (height + label)
        grid.paste(image.convert("RGB"), (x, y))
        font, text = _label_font(prompt[: max(4, width // 6)])
        draw.text((x + 2, y + height + 1), text, fill="black", font=font)
    return grid
