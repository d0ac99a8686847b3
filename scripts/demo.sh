#!/usr/bin/env bash
# Quick start: set up .venv, bring the whole mesh up on this machine (etcd, router, one attention
# node, two expert nodes; a tiny random DeepSeek-V3 checkpoint unless --model DIR is given), stream
# one generation through the client SDK (`moemesh query`), then stop every process.
# Arguments go to `moemesh up`, e.g. scripts/demo.sh --model /path/to/DeepSeek-V2-Lite --expert-nodes 4
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-venv.sh" test >&2
moemesh="$root/.venv/bin/moemesh"
prompt="${MOEMESH_DEMO_PROMPT:-The river ran past the old mill and}"

coproc UP { exec "$moemesh" up --port 0 "$@"; }
up_pid=$UP_PID
trap 'kill -TERM "$up_pid" 2>/dev/null || true; wait "$up_pid" 2>/dev/null || true' EXIT
if ! read -r -t 600 ready <&"${UP[0]}"; then
  echo "demo: the mesh did not come up (see the messages above)" >&2
  exit 1
fi
router=$("$root/.venv/bin/python" -c 'import json, sys; print(json.loads(sys.argv[1])["router"])' "$ready")
echo "demo: mesh ready in $("$root/.venv/bin/python" -c 'import json, sys; print(json.loads(sys.argv[1])["seconds"])' "$ready") s; router at $router" >&2
echo "$prompt"
"$moemesh" query --router "$router" --prompt "$prompt" --max-tokens 48 --temperature 0.8 --seed 0
