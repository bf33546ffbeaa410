"""`dittune sample --low-vram`: the same image or clip as the stock path, text encoders gone before the denoiser
runs, the peak memory reported; 8-bit T5 layers (bitsandbytes, run here on the CPU)."""

from __future__ import annotations

import gc
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_images_close, read_image
from dittune.cli.main import main
from dittune.models.registry import spec_class
from dittune.sample_low_vram import PeakMemory, encoder_modules, load_encoders

PROMPT = "a red circle on a white background"
PEAK = re.compile(r"^peak memory: ([0-9.]+) MiB \(cpu RSS", re.MULTILINE)


def live_text_encoders(model: Path) -> int:
    """transformers models loaded from `model` that are still reachable."""
    from transformers import PreTrainedModel

    gc.collect()
    return sum(
        1
        for obj in gc.get_objects()
        if isinstance(obj, PreTrainedModel) and str(obj.config._name_or_path).startswith(str(model))
    )


def sample(model: Path, family: str, out: Path, extra: list[str]) -> int:
    """Run `dittune sample`; returns how many text encoders were alive when the denoiser first ran."""
    denoiser_class = spec_class(family).denoiser_class
    alive: list[int] = []

    def first_denoiser_call(module: nn.Module, args: object) -> None:
        if type(module).__name__ == denoiser_class and not alive:
            alive.append(live_text_encoders(model))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(first_denoiser_call)
    try:
        args = ["sample", "--model", str(model), "--prompt", PROMPT, "--negative-prompt", "blurry", "--seed", "3"]
        args += ["--steps", "2", "--guidance", "4", "--width", "64", "--height", "64", "--precision", "fp32"]
        assert main([*args, *extra, "--out", str(out)]) == 0
    finally:
        handle.remove()
    assert len(alive) == 1
    return alive[0]


@pytest.mark.parametrize(
    ("family", "extra"),
    [("sd3", []), ("hunyuan-dit", []), ("ltx-video", ["--frames", "9", "--fps", "8"])],
)
def test_low_vram_matches_the_stock_path(family, extra, family_models, video_models, tmp_path, capsys) -> None:
    source = (video_models if family == "ltx-video" else family_models)[family]
    model = shutil.copytree(source, tmp_path / "model")  # a path of its own: its encoders are this test's
    stock = sample(model, family, tmp_path / "stock.png", extra)
    printed = capsys.readouterr().out
    assert stock > 0  # the stock pipeline holds its text encoders while it denoises
    assert "peak memory" not in printed

    freed = sample(model, family, tmp_path / "low.png", [*extra, "--low-vram"])
    printed = capsys.readouterr().out
    assert freed == 0  # encoded, then released before the denoiser's first step
    assert_images_close(read_image(tmp_path / "low.png"), read_image(tmp_path / "stock.png"))
    assert read_image(tmp_path / "low.png").std() > 0
    (peak,) = PEAK.findall(printed)
    assert float(peak) >= 0


def test_peak_memory_sees_an_allocation() -> None:
    import time

    with PeakMemory(torch.device("cpu")) as meter:
        block = torch.ones(256 * 1024 * 1024 // 4)  # 256 MiB, touched (freed memory the process keeps may serve a bit)
        time.sleep(0.1)  # held for many sampling intervals: a busy machine may delay the sampler thread
        del block
    assert meter.peak_bytes >= 192 * 1024 * 1024, meter.peak_bytes
    assert PEAK.match(meter.line())
    with PeakMemory(torch.device("cpu")) as idle:
        pass
    assert idle.peak_bytes < meter.peak_bytes


def test_eight_bit_t5_is_quantised_and_close(family_models) -> None:
    """The 8-bit swap (on the CPU here; the CLI uses it on CUDA): T5 Linear weights become int8, T5's `wo` and the
    CLIP encoders stay as they were, and the T5 embedding stays close to the full-precision one."""
    spec = spec_class("sd3")(family_models["sd3"])
    cpu = torch.device("cpu")
    full, none = load_encoders(spec, cpu, torch.float32, eight_bit=False)
    quantised, converted = load_encoders(spec, cpu, torch.float32, eight_bit=True)
    assert none == [] and converted == ["T5EncoderModel"]
    t5 = next(m for m in encoder_modules(quantised) if type(m).__name__ == "T5EncoderModel")
    dtypes = {name: module.weight.dtype for name, module in t5.named_modules() if hasattr(module, "weight")}
    assert dtypes["encoder.block.0.layer.0.SelfAttention.q"] == torch.int8
    assert dtypes["encoder.block.0.layer.1.DenseReluDense.wo"] == torch.float32
    clips = [m for m in encoder_modules(quantised) if type(m).__name__.startswith("CLIP")]
    assert clips and all(p.dtype == torch.float32 for m in clips for p in m.parameters())

    want = spec.encode_prompts(full, [PROMPT])[0]
    got = spec.encode_prompts(quantised, [PROMPT])[0]
    t5_keys = [k for k in want if k.startswith("t5")]
    assert t5_keys
    for key in want:
        if key in t5_keys:
            error = (got[key] - want[key]).norm() / want[key].norm()
            assert 0 < error < 0.05, (key, error)
        else:
            torch.testing.assert_close(got[key], want[key])
    assert np.isfinite(sum(float(v.abs().sum()) for v in got.values()))
