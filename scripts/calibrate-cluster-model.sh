#!/usr/bin/env bash
# The cluster model against a measured mesh on this machine: `moemesh profile`, then `moemesh bench --mesh`
# (1 attention + 2 expert nodes, micro-batch overlap on = 2 micro-batches and off = 1) at each batch, each run at
# two lengths so the prefill cancels: decode tokens/s = batch x (long - short) / (time long - time short).
# Prints one row per shape: measured, predicted (`moemesh plan --cluster --profile`), error.
#   usage: scripts/calibrate-cluster-model.sh MODEL_DIR [BATCHES (default "32 8")] [PROMPT_LEN (default 16)]
set -euo pipefail
model="$1"; batches="${2:-32 8}"; prompt="${3:-16}"; short=8; long=40
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"; mm="$root/.venv/bin/moemesh"
out="$(mktemp -d)"
"$mm" profile --model "$model" --threads 1 --batches 1,4,8,16,32,64 --contexts "$prompt,$((prompt + long))" --repeats 5 \
  --json > "$out/profile.json"
for b in $batches; do
  for n in $short $long; do
    "$mm" bench --mesh --model "$model" --batch "$b" --prompt-len "$prompt" --new-tokens "$n" --hop-samples 50 \
      --json > "$out/bench-$b-$n.json"
  done
done
"$root/.venv/bin/python" - "$out" "$model" "$batches" "$prompt" "$short" "$long" <<'PY'
import json, subprocess, sys
out, model, batches, prompt, short, long = sys.argv[1], sys.argv[2], sys.argv[3].split(), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
mm = sys.executable.rsplit("/", 1)[0] + "/moemesh"
print(f"{'shape':40}{'measured tok/s':>16}{'predicted':>12}{'error':>9}")
for b in map(int, batches):
    runs = {n: json.load(open(f"{out}/bench-{b}-{n}.json")) for n in (short, long)}
    for key, m in (("mesh_tokens_per_s", 2), ("mesh_no_overlap_tokens_per_s", 1)):
        t = {n: b * n / runs[n][key] for n in (short, long)}
        measured = b * (long - short) / (t[long] - t[short])
        pred = json.loads(subprocess.check_output([mm, "plan", "--cluster", "--model", model, "--profile",
            f"{out}/profile.json", "--attention-nodes", "1", "--expert-nodes", "2", "--batch", str(b),
            "--micro-batches", str(m), "--context", str(prompt + (short + long) // 2), "--json"]))
        shape = f"1 attn + 2 experts, batch {b}, {m} micro-batch{'es' if m > 1 else ''}"
        print(f"{shape:40}{measured:16.1f}{pred['tokens_per_s']:12.1f}{pred['tokens_per_s'] / measured - 1:+9.0%}")
print(f"(profile and bench outputs in {out})")
PY
