"""Precision chosen by the hardware: detection from CPU flags, the "auto" rule, and what a run reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import write_config
from dittune import precision as precision_module
from dittune.precision import CpuBf16, choose_precision, cpu_bf16

AVX2 = "flags\t\t: fpu sse sse2 avx avx2 fma f16c\n"
AVX512 = "flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni\n"
AVX512_BF16 = "flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni avx512_bf16\n"
AMX = "flags\t\t: avx2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8\n"


@pytest.mark.parametrize(
    ("cpuinfo", "environ", "native", "detail"),
    [
        (AVX2, {}, False, "AVX2"),
        (AVX512, {}, False, "AVX512"),
        (AVX512_BF16, {}, True, "AVX512-BF16"),
        (AMX, {}, True, "AMX"),
        ("flags : sse2\n", {}, False, "no AVX2"),
        (AVX512_BF16, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False, "disabled by ONEDNN_MAX_CPU_ISA=AVX2"),
        (AMX, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, True, "AMX"),
        (AVX512_BF16, {"ONEDNN_MAX_CPU_ISA": "avx512_core_bf16"}, True, "AVX512-BF16"),
        (AVX512_BF16, {"ATEN_CPU_CAPABILITY": "avx2"}, False, "limited to AVX2"),
    ],
)
def test_cpu_bf16_reads_the_feature_flags(cpuinfo, environ, native, detail) -> None:
    found = cpu_bf16(cpuinfo=cpuinfo, machine="x86_64", environ=environ)
    assert found.native is native
    assert detail in found.detail


def test_cpu_bf16_on_arm() -> None:
    assert cpu_bf16(cpuinfo="Features\t: fp asimd bf16 i8mm\n", machine="aarch64", environ={}).native
    assert not cpu_bf16(cpuinfo="Features\t: fp asimd\n", machine="aarch64", environ={}).native


def test_this_machine_agrees_with_torch_capability() -> None:
    """Where torch's kernels are limited below AVX-512, bf16 cannot be native, whatever the flags say."""
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        assert not cpu_bf16().native
    assert cpu_bf16().native == cpu_bf16(torch_capability=capability).native


@pytest.mark.parametrize(
    ("requested", "device", "kwargs", "expected", "reason"),
    [
        ("auto", "cuda", {"cuda_bf16": True}, "bf16", "this GPU supports bf16"),
        ("auto", "cuda", {"cuda_bf16": False}, "fp16", "no bf16"),
        ("auto", "cpu", {"cpu": CpuBf16(True, "AMX")}, "bf16", "natively (AMX)"),
        ("auto", "cpu", {"cpu": CpuBf16(False, "AVX2")}, "fp32", "this CPU has no native bf16 (AVX2)"),
        ("auto", "mps", {}, "fp32", "mps"),
        ("auto", "cpu", {"cpu": CpuBf16(False, "AVX2"), "needs": "bf16"}, "bf16", "model.weight_dtype"),
        ("no", "cuda", {"cuda_bf16": True}, "fp32", "as configured"),
        ("fp32", "cpu", {"cpu": CpuBf16(True, "AMX")}, "fp32", "as configured"),
        ("bf16", "cpu", {"cpu": CpuBf16(True, "AMX")}, "bf16", "as configured"),
    ],
)
def test_auto_rule(requested, device, kwargs, expected, reason) -> None:
    chosen = choose_precision(requested, device, **kwargs)
    assert chosen.name == expected
    assert reason in chosen.reason
    assert chosen.warning is None
    assert chosen.mixed_precision == {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[expected]


def test_explicit_bf16_on_a_cpu_without_it_warns_once_but_is_kept() -> None:
    chosen = choose_precision("bf16", "cpu", cpu=CpuBf16(False, "AVX2"))
    assert chosen.name == "bf16"
    assert chosen.warning is not None and "AVX2" in chosen.warning and "\n" not in chosen.warning
    with pytest.raises(ValueError, match="unknown precision"):
        choose_precision("int8", "cpu", cpu=CpuBf16(False, "AVX2"))


@pytest.fixture
def slow_bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make this machine look like an AVX2-only CPU to the precision rule."""
    monkeypatch.setattr(precision_module, "cpu_bf16", lambda *a, **k: CpuBf16(False, "AVX2"))


@pytest.fixture
def fast_bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_module, "cpu_bf16", lambda *a, **k: CpuBf16(True, "AMX"))


def _train(tmp_path: Path, tiny_models, dataset, capsys, *extra: str) -> tuple[str, list[float]]:
    import json

    from dittune.cli.main import main

    cfg = write_config(
        tmp_path / "cfg.toml", tiny_models["v1.2"], dataset, tmp_path / "run", max_steps=1, mixed_precision=None
    )
    assert main(["train", str(cfg), *extra]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return capsys.readouterr().out, [json.loads(line)["loss"] for line in lines]


@pytest.mark.usefixtures("slow_bf16_cpu", "one_thread")
def test_auto_trains_in_fp32_on_a_cpu_without_bf16_and_says_why(tmp_path, tiny_models, dataset, capsys) -> None:
    out, _ = _train(tmp_path, tiny_models, dataset, capsys)
    assert "Precision  fp32 (auto): this CPU has no native bf16 (AVX2); frozen weights fp32" in out
    assert "warning: bf16" not in out


@pytest.mark.usefixtures("fast_bf16_cpu", "one_thread")
def test_auto_trains_in_bf16_on_a_cpu_with_it(tmp_path, tiny_models, dataset, capsys) -> None:
    out, _ = _train(tmp_path, tiny_models, dataset, capsys)
    assert "Precision  bf16 (auto): this CPU computes bf16 natively (AMX); frozen weights bf16" in out


@pytest.mark.usefixtures("slow_bf16_cpu", "one_thread")
def test_explicit_bf16_on_a_slow_cpu_trains_with_a_warning(tmp_path, tiny_models, dataset, capsys) -> None:
    out, losses = _train(tmp_path, tiny_models, dataset, capsys, "--set", 'train.mixed_precision="bf16"')
    warnings = [line for line in out.splitlines() if line.startswith("warning: bf16 on this CPU")]
    assert len(warnings) == 1
    assert "Precision  bf16 (train.mixed_precision = 'bf16'): as configured" in out
    assert len(losses) == 1 and losses[0] > 0


@pytest.mark.usefixtures("one_thread")
def test_sample_precision_follows_the_same_rule(tmp_path, tiny_models, monkeypatch, capsys) -> None:
    import numpy as np
    from PIL import Image

    from dittune.sample import run_sample

    common = {"model": tiny_models["v1.2"], "prompt": "a red circle", "steps": 3, "width": 64, "height": 64}
    monkeypatch.setattr(precision_module, "cpu_bf16", lambda *a, **k: CpuBf16(False, "AVX2"))
    auto = run_sample(**common, out=tmp_path / "auto.png")
    assert "fp32)" in capsys.readouterr().out
    fp32 = run_sample(**common, out=tmp_path / "fp32.png", precision="fp32")
    bf16 = run_sample(**common, out=tmp_path / "bf16.png", precision="bf16")
    assert "warning: bf16 on this CPU (AVX2" in capsys.readouterr().out
    pixels = {p.stem: np.asarray(Image.open(p), dtype=np.float32) for p in (auto, fp32, bf16)}
    assert np.array_equal(pixels["auto"], pixels["fp32"])
    difference = np.abs(pixels["bf16"] - pixels["fp32"]).mean()
    assert 0 < difference < 8, difference  # bf16 really ran, and draws nearly the same image

    monkeypatch.setattr(precision_module, "cpu_bf16", lambda *a, **k: CpuBf16(True, "AMX"))
    auto = run_sample(**common, out=tmp_path / "auto-amx.png")
    assert "bf16)" in capsys.readouterr().out
    assert np.array_equal(np.asarray(Image.open(auto), dtype=np.float32), pixels["bf16"])
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        run_sample(**common, out=tmp_path / "fp16.png", precision="fp16")
