#!/usr/bin/env bash
# GPU benchmark: training-step time, samples/s and peak memory of a Hunyuan-DiT at its real width (hidden 1408,
# 16 heads of 88, text 77/256 tokens; 8 of its 40 blocks by default), LoRA and full fine-tuning, fp32 and bf16,
# with and without gradient checkpointing, eager and compiled (train.compile). Writes
# benchmarks/results/gpu-cuda.md (GPU, torch and CUDA versions, date, command, table).
#
#   bash benchmarks/gpu.sh [gpu_step.py options]     e.g. --layers 4 --size 512 --batch-size 4
#
# Nothing is downloaded or read: the model is built with random weights on the GPU. The environment:
# $DITTUNE_PYTHON if set, else the active virtualenv, else .venv in the repository, created if missing with
# `pip install -e ".[dev]" -c constraints.txt` (torch pin left out: the torch already in the environment is kept).
# The script uses whatever torch that environment has and stops with a message if it has no CUDA: install
# the CUDA build of torch first, e.g.
#     python3 -m venv .venv && .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu128
# then run this script (it installs dittune around that torch). Takes ~10–20 min on one H100-class GPU
# (16 configurations; each compiled one compiles its blocks first).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export HF_HUB_OFFLINE=1
export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error}
export DIFFUSERS_VERBOSITY=${DIFFUSERS_VERBOSITY:-error}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ -n "${DITTUNE_PYTHON:-}" ]]; then
    PY=$DITTUNE_PYTHON
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    PY=$VIRTUAL_ENV/bin/python
else
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
        echo "error: dittune needs Python 3.10 or newer; python3 is $(python3 --version 2>&1)" >&2
        exit 1
    }
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    PY=$REPO/.venv/bin/python
fi

if ! "$PY" -c 'import dittune, torch, diffusers, peft' >/dev/null 2>&1; then
    echo "==> installing dittune into $("$PY" -c 'import sys; print(sys.prefix)') (keeping its torch, if any)"
    constraints=$(mktemp)
    grep -v '^torch==' constraints.txt >"$constraints"
    "$PY" -m pip install --quiet -e ".[dev]" -c "$constraints"
    rm -f "$constraints"
fi

# One Python start for the check and the message (sys.exit with a string: status 1 → exit 2 below).
"$PY" - <<'EOF' || exit 2
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(
        f"error: torch {torch.__version__} in this environment has no usable CUDA GPU (torch.version.cuda = "
        f"{torch.version.cuda}). This benchmark uses the environment's torch as it is: install a CUDA build first, "
        "e.g. pip install torch --index-url https://download.pytorch.org/whl/cu128 (or set DITTUNE_PYTHON to a "
        "Python that has one). A CPU smoke test of the script: python benchmarks/gpu_step.py --device cpu --tiny"
    )
print(f"==> {torch.cuda.get_device_name(0)} | torch {torch.__version__} | CUDA {torch.version.cuda}")
EOF

export DITTUNE_BENCH_COMMAND="bash benchmarks/gpu.sh $*"
exec "$PY" benchmarks/gpu_step.py --device cuda --write "$REPO/benchmarks/results/gpu-cuda.md" "$@"
