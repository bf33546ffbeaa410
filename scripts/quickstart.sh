#!/usr/bin/env bash
# dittune quickstart: a complete LoRA run on CPU in a couple of minutes, with no downloads.
#
#   bash scripts/quickstart.sh [OUT_DIR]        (default: quickstart-out/ in the repository)
#
# 1. finds a Python environment with dittune installed, or creates .venv in the repository
#    (pip install -e ".[dev]" -c constraints.txt; the pinned torch is the CPU wheel);
# 2. builds a tiny random Hunyuan-DiT with `dittune tiny hunyuan-dit OUT/model` (skipped if present);
# 3. draws a small captioned dataset with `python -m dittune.demo.shapes OUT/data`;
# 4. writes OUT/config.toml and runs `dittune train` (LoRA, 60 steps, validation every 20 steps,
#    a checkpoint every 30); a re-run starts OUT/run afresh but reuses the caches in OUT/cache;
# 5. samples one image with the trained LoRA (`dittune sample`) and prints where everything is.
#
# The model has random weights: the images show the machinery working, not image quality.
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
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
        echo "error: dittune needs Python 3.10 or newer; python3 is $(python3 --version 2>&1)" >&2
        exit 1
    }
    [[ -x "$REPO/.venv/bin/python" ]] || python3 -m venv "$REPO/.venv"
    (cd "$REPO" && .venv/bin/python -m pip install -e ".[dev]" -c constraints.txt)
    PY=$REPO/.venv/bin/python
fi
BIN=$(dirname "$PY")
dittune() { "$PY" -m dittune "$@"; }
echo "Using $PY"

# --- 2. tiny model -------------------------------------------------------------------------
if [[ -f "$OUT/model/model_index.json" ]]; then
    say "Tiny Hunyuan-DiT already in $OUT/model"
else
    say "Building a tiny random Hunyuan-DiT (v1.2 layout) in $OUT/model"
    rm -rf "$OUT/model"
    dittune tiny hunyuan-dit "$OUT/model" --seed 0
fi

# --- 3. dataset ----------------------------------------------------------------------------
say "Drawing 24 captioned shapes into $OUT/data"
"$PY" -m dittune.demo.shapes "$OUT/data" --count 24 --seed 0

# --- 4. config and training ----------------------------------------------------------------
cat >"$OUT/config.toml" <<'TOML'
# Written by scripts/quickstart.sh. Relative paths are resolved against this file's folder.
# Every option: `dittune config docs`. Check a config: `dittune config check config.toml`.
output_dir = "run"

[model]
family = "hunyuan-dit"
path = "model"                 # built by `dittune tiny hunyuan-dit model`

[data]
path = "data"                  # PNGs with same-stem .txt captions
resolution = 64                # short edge in pixels
resolution_type = "pixel"
bucket_step = 32               # buckets 64×64, 96×64, 64×96 (alignment 16)

[train]
method = "lora"
max_steps = 60
batch_size = 2
learning_rate = 1e-3
caption_dropout = 0.1          # per sample and text encoder
seed = 0
trackers = ["tensorboard"]

[lora]
rank = 8                       # alpha defaults to rank

[cache]
dir = "cache"                  # outside run/, so a fresh run reuses it

[checkpoint]
every_steps = 30
keep_last = 2

[validation]
every_steps = 20               # plus step 0 and the end
prompts = ["a red circle on a blue background", "a yellow triangle on a black background"]
steps = 10
guidance = 4.0
TOML

say "Training (LoRA, 60 steps); caches in $OUT/cache"
rm -rf "$OUT/run"
dittune train "$OUT/config.toml"

# --- 5. sample -----------------------------------------------------------------------------
say "Sampling with the trained LoRA"
dittune sample --model "$OUT/model" --lora "$OUT/run/final/lora.safetensors" \
    --prompt "a red circle on a blue background" --width 64 --height 64 --steps 20 --seed 0 \
    --out "$OUT/sample.png"

RUN=$OUT/run
cat <<EOF

Quickstart finished in ${SECONDS} s.
  validation grids  $RUN/validation/step_XXXXXXXX/grid.png  (steps 0, 20, 40, 60)
  LoRA              $RUN/final/lora.safetensors
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
