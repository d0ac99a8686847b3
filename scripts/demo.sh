#!/usr/bin/env bash
# Quick start: set up .venv, then stream a generation from the embedded default
# (a tiny random DeepSeek-V3 checkpoint, written to ~/.cache/moemesh on first use).
# Extra arguments go to `moemesh generate`, e.g. scripts/demo.sh --prompt "Hello" --max-tokens 40
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-venv.sh" test >&2
exec "$root/.venv/bin/moemesh" generate "$@"
