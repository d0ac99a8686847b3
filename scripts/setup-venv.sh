#!/usr/bin/env bash
# Create .venv (if missing) and install moemesh with its test extras into it.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it only installs what changed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MOEMESH_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$venv/.moemesh-install-stamp"
extras="${1:-test}"
# Reinstall only when pyproject.toml changed since the last install into this venv.
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$(cat "$stamp")" != "$extras" ]; then
  # torch is pinned in pyproject.toml to the CPU wheel these machines carry; installing it first
  # keeps pip from resolving a multi-GB CUDA build through another package's looser range.
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
  "$venv/bin/python" -m pip install --quiet -e "$root[$extras]"
  echo "$extras" > "$stamp"
fi
