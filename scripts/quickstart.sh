#!/usr/bin/env bash
# dittune quickstart: teach a small pretrained model a new word with a LoRA, on CPU, no downloads.
#
#   bash scripts/quickstart.sh [OUT_DIR]        (default: quickstart-out/ in the repository)
#
# 1. finds a Python environment with dittune installed, or creates .venv in the repository
#    (scripts/venv.sh: pip install -e ".[dev]" -c constraints.txt; the pinned torch is the CPU wheel);
# 2. runs `python -m dittune.demo.quickstart OUT_DIR`, which
#    - draws 64 rings with English/Chinese captions into OUT/data: "ring" (圆环) is a word the
#      base model demo/base (a tiny Hunyuan-DiT trained on filled shapes) has never seen;
#    - writes OUT/config.toml and runs `dittune train` on it: a LoRA, 500 steps in the precision this
#      CPU computes fastest (mixed_precision = "auto": bf16 with AMX/AVX512-BF16, else fp32),
#      validation grids before training, every 166 steps and at the end; caches in OUT/cache are
#      reused by a re-run;
#    - stacks the first and last grids into OUT/before_after.png (the run writes run/loss.png);
#    - measures base and LoRA on held-out ring prompts and seeds (hollow shapes, colour accuracy);
# 3. samples one image with the LoRA (`dittune sample`) and prints where everything is.
#
# Deterministic: the same seed gives the same LoRA, images and numbers on the same kind of CPU (with or
# without native bf16: the two compute in different precisions).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$REPO/quickstart-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SECONDS=0

export HF_HUB_OFFLINE=1
export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error}
export DIFFUSERS_VERBOSITY=${DIFFUSERS_VERBOSITY:-error}

say() { printf '\n==> %s\n' "$*"; }

usable() { "$1" -c 'import dittune.demo.shapes, torch, diffusers, peft, accelerate' >/dev/null 2>&1; }

# --- 1. environment ------------------------------------------------------------------------
PY=""
for candidate in "$REPO/.venv/bin/python" "$(command -v python3 || true)"; do
    if [[ -n "$candidate" && -x "$candidate" ]] && usable "$candidate"; then
        PY=$candidate
        break
    fi
done
if [[ -z "$PY" ]]; then
    say "No environment with dittune found; creating $REPO/.venv"
    # shellcheck source=scripts/venv.sh
    . "$REPO/scripts/venv.sh"
    ensure_venv "$REPO"
fi
BIN=$(dirname "$PY")
dittune() { "$PY" -m dittune "$@"; }
echo "Using $PY"

# --- 2. LoRA on the demo base --------------------------------------------------------------
say "Teaching demo/base the word 'ring' with a LoRA (dittune train)"
"$PY" -m dittune.demo.quickstart "$OUT" --base "$REPO/demo/base"

# --- 3. sample -----------------------------------------------------------------------------
say "Sampling with the trained LoRA"
dittune sample --model "$REPO/demo/base" --lora "$OUT/run/final/lora.safetensors" \
    --prompt "a yellow ring on a purple background" --width 80 --height 80 --steps 25 --guidance 4 \
    --seed 0 --out "$OUT/sample.png"

RUN=$OUT/run
cat <<EOF

Quickstart finished in ${SECONDS} s.
  before / after    $OUT/before_after.png  (validation grids at step 0 and at the end)
  validation grids  $RUN/validation/step_XXXXXXXX/grid.png
  loss plot         $RUN/loss.png
  LoRA              $RUN/final/lora.safetensors
  measurements      $OUT/summary.json  (images: $OUT/eval_base.png, $OUT/eval_lora.png)
  checkpoints       $RUN/checkpoints/  (resume: dittune train $OUT/config.toml --resume latest)
  metrics           $RUN/metrics.jsonl
  TensorBoard logs  $RUN/logs/
                    $BIN/tensorboard --logdir $RUN/logs
  sample            $OUT/sample.png
  config            $OUT/config.toml
EOF
if [[ -f "$BIN/activate" ]]; then
    echo "To use dittune and tensorboard directly: source $BIN/activate"
fi
