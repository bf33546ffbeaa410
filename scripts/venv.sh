# Sourced by scripts/test.sh and scripts/quickstart.sh: create or reuse the repository's .venv with the
# pinned install (pip install -e ".[dev]" -c constraints.txt; torch resolves to the CPU wheel here).
#
#   ensure_venv REPO [VENV]     sets PY to the environment's python
#
# The install is repeated only when pyproject.toml or constraints.txt changed since the last one
# (their hash is kept in VENV/.dittune-install), so a second run starts at once.

ensure_venv() {
    local repo=$1 venv=${2:-$1/.venv}
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
        echo "error: dittune needs Python 3.10 or newer; python3 is $(python3 --version 2>&1)" >&2
        return 1
    }
    local stamp want
    stamp=$venv/.dittune-install
    want=$(cat "$repo/pyproject.toml" "$repo/constraints.txt" | python3 -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
    if [[ ! -x "$venv/bin/python" ]]; then
        echo "Creating $venv"
        python3 -m venv "$venv"
    fi
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
        echo "Installing dittune and its pinned dependencies into $venv (pip install -e \".[dev]\" -c constraints.txt)"
        (cd "$repo" && PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install --quiet -e ".[dev]" -c constraints.txt)
        echo "$want" > "$stamp"
    fi
    PY=$venv/bin/python
}
