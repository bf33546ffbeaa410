#!/usr/bin/env bash
# Run the test suite from a fresh clone or an existing checkout: one command.
#
#   bash scripts/test.sh [PYTEST ARGS ...]      e.g. bash scripts/test.sh -k precision
#
# Creates or reuses .venv in the repository (the same one the quickstart uses) with the pinned
# install, then runs pytest on 2 workers and prints the ten slowest tests. DITTUNE_VENV=DIR uses
# another environment folder. The exit status is pytest's.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/venv.sh
. "$REPO/scripts/venv.sh"
export HF_HUB_OFFLINE=1

started=$SECONDS
ensure_venv "$REPO" "${DITTUNE_VENV:-$REPO/.venv}"
"$PY" - <<'PY'
import platform, torch
from dittune.precision import cpu_bf16
cpu = cpu_bf16()
print(f"environment: Python {platform.python_version()}, torch {torch.__version__}, "
      f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
      f"native bf16: {'yes' if cpu.native else 'no'} ({cpu.detail})")
PY
echo "environment ready in $((SECONDS - started)) s"

cd "$REPO"
exec "$PY" -m pytest -q -n 2 --durations=10 "$@"
