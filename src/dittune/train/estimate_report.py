"""`dittune estimate` output: a table of the phases' peaks by component, or the same as JSON."""

from __future__ import annotations

from typing import Any

from dittune.train.estimate import (
    CONTROLNET,
    CONTROLNET_FROZEN,
    EXPERTS,
    FROZEN,
    OPTIMIZER,
    TEXT_ENCODERS,
    TRAINABLE,
    VAE,
    Estimate,
)
from dittune.train.memory import ACTIVATIONS, GRADIENTS

ROWS = (
    TEXT_ENCODERS,
    VAE,
    FROZEN,
    TRAINABLE,
    CONTROLNET_FROZEN,
    CONTROLNET,
    GRADIENTS,
    OPTIMIZER,
    EXPERTS,
    ACTIVATIONS,
)
"""Components in table order (labels of `dittune.train.memory`)."""
DEVICE_NOTE = {
    "cuda": (
        "Tensor memory only. CUDA adds its context (~300–500 MiB per process) and the caching allocator's "
        "rounding and fragmentation (often 5–20 % more); leave that headroom."
    ),
    "cpu": "Tensor memory only; the process itself (Python, libraries) adds ~1–2 GiB of resident memory.",
}
NOT_COUNTED = (
    "Not counted: several processes (each GPU holds a full copy unless FSDP or DeepSpeed shards it; DDP adds "
    "gradient buckets), the data loader's host memory, fused-kernel workspaces."
)


def size(nbytes: float | None) -> str:
    """Bytes as KiB / MiB / GiB with three significant figures; "–" for none."""
    if nbytes is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            value = nbytes / scale
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{int(nbytes)} B"


def format_estimate(est: Estimate, source: str = "") -> str:
    """The table printed by `dittune estimate`."""
    head = f"Memory estimate{f' for {source}' if source else ''}: {est.device}, no weights loaded"
    lines = [head, *(f"  assumed: {line}" for line in est.assumptions), ""]
    names = [phase.name for phase in est.phases]
    labels = [label for label in ROWS if any(_at_peak(est, n).get(label) for n in names)]
    width = max(len(label) for label in [*labels, "peak"]) + 2
    lines.append(" " * width + "".join(f"{name:>13}" for name in names))
    for label in labels:
        cells = [_at_peak(est, name).get(label) for name in names]
        lines.append(f"{label:<{width}}" + "".join(f"{size(cell):>13}" for cell in cells))
    lines.append(f"{'peak':<{width}}" + "".join(f"{size(phase.peak):>13}" for phase in est.phases))
    lines.append("")
    for phase in est.phases:
        if phase.problem:
            lines.append(f"{phase.name}: {phase.problem}")
            continue
        stages = "; ".join(f"{s.name} ({s.detail}) {size(s.peak)}" for s in phase.stages)
        host = {label: nbytes for s in phase.stages for label, nbytes in s.host.items()}
        extra = "".join(f"; {label} {size(nbytes)} on the host" for label, nbytes in host.items())
        lines.append(f"{phase.name}: {stages}{extra}")
    weights = ", ".join(f"{name} {size(sum(sizes.values()))}" for name, sizes in est.weights.items())
    lines += ["", f"weights (exact): {weights}"]
    lines += [f"not modelled: {note}" for note in est.not_modelled]
    lines += ["", DEVICE_NOTE.get(est.device, DEVICE_NOTE["cuda"]), NOT_COUNTED, f"({est.seconds:.1f} s)"]
    return "\n".join(lines)


def _at_peak(est: Estimate, name: str) -> dict[str, int]:
    stage = est.phase(name).worst
    return {} if stage is None or est.phase(name).problem else stage.at_peak


def estimate_json(est: Estimate) -> dict[str, Any]:
    """The estimate as JSON-ready data (bytes as integers)."""
    return {
        "device": est.device,
        "precision": est.precision,
        "weight_dtype": est.weight_dtype,
        "assumptions": est.assumptions,
        "phases": {
            phase.name: {
                "peak_bytes": phase.peak,
                "at_peak": _at_peak(est, phase.name),
                "problem": phase.problem,
                "stages": [
                    {"name": s.name, "detail": s.detail, "peak_bytes": s.peak, "at_peak": s.at_peak, "host": s.host}
                    for s in phase.stages
                ],
            }
            for phase in est.phases
        },
        "weights": est.weights,
        "not_modelled": est.not_modelled,
        "notes": [DEVICE_NOTE.get(est.device, DEVICE_NOTE["cuda"]), NOT_COUNTED],
        "seconds": round(est.seconds, 2),
    }
