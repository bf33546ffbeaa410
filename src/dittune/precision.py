"""Which precision to compute in, chosen from the hardware: bf16 where it is fast, fp32 where it is not.

A bf16 matmul on a CPU without native bf16 (AVX2 only) runs ~70× slower than fp32; with AMX or
AVX512-BF16 it runs several times faster. On CUDA, bf16 is the usual choice wherever the GPU supports it.
Importing this module does not import torch (`dittune config check` stays fast); torch is asked only
about devices.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

ONEDNN_BF16_ISAS = ("BF16", "AMX", "AVX10", "FP16", "ALL")
"""ONEDNN_MAX_CPU_ISA values (substrings) that still allow oneDNN's native bf16 kernels."""


@dataclass(frozen=True)
class CpuBf16:
    """Whether this CPU computes bf16 natively, and the name of what decided it."""

    native: bool
    detail: str


def _x86_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_bf16(
    cpuinfo: str | None = None,
    machine: str | None = None,
    environ: dict[str, str] | None = None,
    torch_capability: str | None = None,
) -> CpuBf16:
    """Detect native bf16 from the CPU's own feature flags (not from the vendor name).

    x86: AMX-BF16 or AVX512-BF16, and neither torch (`ATEN_CPU_CAPABILITY`) nor oneDNN
    (`ONEDNN_MAX_CPU_ISA`) told to stay below them. Arm: the `bf16` feature (Linux) or FEAT_BF16
    (macOS). The arguments exist for tests; by default they are read from this machine.
    """
    environ = dict(os.environ) if environ is None else environ
    machine = (machine or platform.machine()).lower()
    if machine in ("arm64", "aarch64"):
        if cpuinfo is None and platform.system() == "Darwin":
            return _darwin_bf16()
        flags = _x86_flags(cpuinfo if cpuinfo is not None else _read_cpuinfo())
        return CpuBf16("bf16" in flags, "Arm with BF16" if "bf16" in flags else "Arm without BF16")
    flags = _x86_flags(cpuinfo if cpuinfo is not None else _read_cpuinfo())
    if "amx_bf16" in flags:
        found = "AMX"
    elif "avx512_bf16" in flags:
        found = "AVX512-BF16"
    else:
        best = "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        return CpuBf16(False, best)
    onednn = environ.get("ONEDNN_MAX_CPU_ISA", environ.get("DNNL_MAX_CPU_ISA", "")).upper()
    if onednn and not any(isa in onednn for isa in ONEDNN_BF16_ISAS):
        return CpuBf16(False, f"{found} disabled by ONEDNN_MAX_CPU_ISA={onednn}")
    capability = (torch_capability or environ.get("ATEN_CPU_CAPABILITY", "")).upper()
    if capability and not capability.startswith("AVX512"):
        return CpuBf16(False, f"{found}, torch kernels limited to {capability}")
    return CpuBf16(True, found)


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _darwin_bf16() -> CpuBf16:
    try:
        out = subprocess.run(
            ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return CpuBf16(out == "1", "Apple silicon with BF16" if out == "1" else "Apple silicon without BF16")


PRECISIONS = ("fp32", "bf16", "fp16")
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
"""Precision name → accelerate's `mixed_precision`."""


@dataclass(frozen=True)
class Precision:
    """The precision a run computes in, and why.

    `name` is "fp32", "bf16" or "fp16"; `reason` is one line for the start-up summary; `warning` is set
    when an explicit choice will be slow on this hardware.
    """

    name: str
    reason: str
    warning: str | None = None

    @property
    def mixed_precision(self) -> str:
        """accelerate's name: "no", "bf16" or "fp16"."""
        return MIXED_PRECISION[self.name]


def choose_precision(
    requested: str,
    device_type: str,
    *,
    cuda_bf16: bool = False,
    cpu: CpuBf16 | None = None,
    needs: str | None = None,
) -> Precision:
    """Resolve `requested` ("auto", "no"/"fp32", "bf16", "fp16") for a device ("cuda", "cpu", "mps", ...).

    "auto": bf16 on CUDA GPUs that support it (else fp16), on CPUs only with native bf16 (else fp32), fp32
    elsewhere. `needs` is a half dtype the frozen weights were explicitly stored in, which only autocast to
    that dtype can compute with: "auto" then picks it. `cuda_bf16` and `cpu` describe the hardware.
    """
    requested = "fp32" if requested == "no" else requested
    if requested not in ("auto", *PRECISIONS):
        raise ValueError(f"unknown precision {requested!r}; choose auto, fp32, bf16 or fp16")
    cpu_info = cpu if cpu is not None or device_type != "cpu" else cpu_bf16()
    if requested != "auto":
        warning = None
        if requested == "bf16" and device_type == "cpu" and cpu_info is not None and not cpu_info.native:
            warning = (
                f"bf16 on this CPU ({cpu_info.detail}, no native bf16) is much slower than fp32 (often 10× per "
                'step); "auto" would use fp32 here.'
            )
        return Precision(requested, "as configured", warning)
    if needs in ("bf16", "fp16"):
        return Precision(needs, f"the frozen weights are stored in {needs} (model.weight_dtype)")
    if device_type == "cuda":
        if cuda_bf16:
            return Precision("bf16", "this GPU supports bf16")
        return Precision("fp16", "this GPU has no bf16; fp16 with loss scaling")
    if device_type == "cpu":
        assert cpu_info is not None
        if cpu_info.native:
            return Precision("bf16", f"this CPU computes bf16 natively ({cpu_info.detail})")
        return Precision("fp32", f"this CPU has no native bf16 ({cpu_info.detail})")
    return Precision("fp32", f"{device_type} device: fp32 unless set explicitly")


def device_precision(requested: str, device: object, needs: str | None = None) -> Precision:
    """`choose_precision` for a torch device (or its type name), asking torch about CUDA."""
    device_type = getattr(device, "type", str(device))
    cuda_bf16 = False
    if device_type == "cuda":
        import torch

        cuda_bf16 = bool(torch.cuda.is_bf16_supported())
    return choose_precision(requested, device_type, cuda_bf16=cuda_bf16, needs=needs)
