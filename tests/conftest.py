"""Shared fixtures: tiny Hunyuan-DiT pipelines (built once per session) and tiny image datasets."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 230, 20)}


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker() -> Iterator[None]:
    """Every test computes on one thread: the suite runs as two xdist workers on two cores, where a second
    OpenMP thread per worker only spins against the other worker (the quickstart's run took 3× longer so)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded (no OpenMP spin on a shared 2-core machine).

    Opt in per module with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"v1.1": path, "v1.2": path} — real architectures, random weights, diffusers layout."""
    from dittune.models.hunyuan_dit.tiny import build_tiny_hunyuan_dit

    root = tmp_path_factory.mktemp("tiny-models")
    return {variant: build_tiny_hunyuan_dit(root / variant, variant, seed=0) for variant in ("v1.1", "v1.2")}


FAMILIES = ("hunyuan-dit", "sd3", "pixart-sigma", "flux")
"""Every family with a tiny builder; family-parametrised tests run over all of them."""


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> dict[str, Path]:
    """family → tiny pipeline folder (default variant; Hunyuan-DiT reuses the v1.2 model)."""
    from dittune.models.registry import tiny_builder

    root = tmp_path_factory.mktemp("family-models")
    models = {"hunyuan-dit": tiny_models["v1.2"]}
    for family in FAMILIES:
        if family not in models:
            models[family] = tiny_builder(family)(root / family, seed=0)
    return models


VIDEO_FAMILIES = ("ltx-video", "cogvideox", "hunyuan-video", "wan")
"""Video families with a tiny builder; `tests/test_video_families.py` runs each through the same tests."""

VIDEO_CASES = (*VIDEO_FAMILIES, "cogvideox@1.5", "wan@2.2")
"""`family` (default variant) or `family@variant`: the models the generic video tests run on."""


class _BuiltOnFirstUse(dict):
    """family → tiny pipeline folder, built the first time a test asks for it."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, case: str) -> Path:
        from dittune.models.registry import tiny_builder

        family, _, variant = case.partition("@")
        options = {"variant": variant} if variant else {}
        self[case] = tiny_builder(family)(self.root / case.replace("@", "-"), seed=0, **options)
        return self[case]


@pytest.fixture(scope="session")
def video_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family or family@variant (see VIDEO_CASES) → tiny pipeline folder, built on first use."""
    return _BuiltOnFirstUse(tmp_path_factory.mktemp("video-models"))


def make_dataset(
    root: Path,
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (96, 64)),
    colours: tuple[str, ...] = ("red", "blue", "green", "yellow"),
) -> Path:
    """Circles of each colour at each size, with `.txt` captions; returns `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for name in colours:
        for index, (width, height) in enumerate(sizes):
            image = Image.new("RGB", (width, height), (255, 255, 255))
            ImageDraw.Draw(image).ellipse([width // 4, height // 4, 3 * width // 4, 3 * height // 4], COLOURS[name])
            image.save(root / f"{name}_{index}.png")
            (root / f"{name}_{index}.txt").write_text(f"a {name} circle on a white background")
    return root


def write_config(
    path: Path, model: Path, data: Path, output_dir: Path, extra: str = "", family: str = "hunyuan-dit", **train: object
) -> Path:
    """A minimal TOML config; `train` entries go into [train] (None leaves a key out), `extra` is appended.

    Tests compute in fp32 (`mixed_precision = "no"`) unless they ask otherwise, so that exactness and
    determinism do not depend on whether the CPU has native bf16; `mixed_precision=None` leaves the
    default ("auto") to the hardware.
    """
    settings = {"max_steps": 4, "batch_size": 2, "trackers": [], "mixed_precision": "no", **train}
    train_lines = "\n".join(f"{k} = {_toml(v)}" for k, v in settings.items() if v is not None)
    path.write_text(
        f'output_dir = "{output_dir}"\n'
        f'[model]\nfamily = "{family}"\npath = "{model}"\n'
        f'[data]\npath = "{data}"\nresolution = 64\nresolution_type = "pixel"\n'
        f"[train]\n{train_lines}\n{extra}\n"
    )
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


def make_clip(path: Path, frames: int, fps: float = 8.0, size: tuple[int, int] = (64, 64), colour: str = "red") -> Path:
    """An H.264 clip of a `colour` disc moving left to right over `frames` frames (needs PyAV)."""
    from dittune.media import write_frames

    width, height = size
    images = []
    for index in range(frames):
        image = Image.new("RGB", size, (255, 255, 255))
        x = width // 8 + (width // 2) * index // max(1, frames - 1)
        ImageDraw.Draw(image).ellipse([x, height // 4, x + width // 3, height // 4 + height // 3], COLOURS[colour])
        images.append(image)
    return write_frames(images, path, fps)


def make_video_dataset(
    root: Path, frames: int = 9, fps: float = 8.0, colours: tuple[str, ...] = ("red", "blue"), size=(64, 64)
) -> Path:
    """One clip per colour (`name.mp4` + `name.txt`); returns `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for name in colours:
        make_clip(root / f"{name}.mp4", frames, fps, size, name)
        (root / f"{name}.txt").write_text(f"a {name} ball rolling to the right")
    return root


def read_image(path: Path) -> np.ndarray:
    """An image file as an RGB uint8 array."""
    return np.asarray(Image.open(path).convert("RGB"))


def assert_images_close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to float noise: prompts are encoded in batches for the cache and one by one by the pipeline,
    which can move a few pixels by one or two levels; any real difference is far larger."""
    assert got.shape == want.shape
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def read_metrics(output_dir: Path) -> list[dict]:
    """OUTPUT_DIR/metrics.jsonl as one dict per line."""
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
