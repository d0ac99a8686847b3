#!/usr/bin/env bash
# The cluster model against a measured mesh on this machine: `moemesh profile`, then `moemesh bench --mesh`
# (1 attention + 2 expert nodes, micro-batch overlap on = 2 micro-batches and off = 1) at each batch, each run at
# two lengths so the prefill cancels: decode tokens/s = batch x (long - short) / (time long - time short).
# Every bench point runs REPEATS times, round all the points in turn, and its quickest run counts (as the
# profile's points do): a neighbour holding the cores then spoils one run of many points, not one point.
# Prints one row per shape: measured, and predicted by `moemesh plan --cluster --profile` with the nodes on one host
# (--shared-host: the mesh measured here) and apart (the model of a deployment), each with its error; and the load
# average before and after (other work on the machine is the first suspect when a row is off).
# TRANSPORT torch measures torch.distributed too (profile and bench both), one set of rows per transport.
#   usage: scripts/calibrate-cluster-model.sh MODEL_DIR [BATCHES (default "32 16 8")] [PROMPT_LEN (default 16)]
#          [REPEATS (default 3)] [TRANSPORT (default grpc)]
set -euo pipefail
model="$1"; batches="${2:-32 16 8}"; prompt="${3:-16}"; repeats="${4:-3}"; transport="${5:-grpc}"; short=8; long=40
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"; mm="$root/.venv/bin/moemesh"
out="$(mktemp -d)"
cut -d' ' -f1-3 /proc/loadavg > "$out/load-before"
"$mm" profile --model "$model" --threads 1 --batches 1,4,8,16,32,64 --contexts "$prompt,$((prompt + long))" --repeats 5 \
  --transport "$transport" --json > "$out/profile.json"
for r in $(seq "$repeats"); do
  for b in $batches; do
    for n in $short $long; do
      "$mm" bench --mesh --model "$model" --batch "$b" --prompt-len "$prompt" --new-tokens "$n" --hop-samples 50 \
        --transport "$transport" --json > "$out/bench-$b-$n-$r.json"
    done
  done
done
cut -d' ' -f1-3 /proc/loadavg > "$out/load-after"
"$root/.venv/bin/python" - "$out" "$model" "$batches" "$prompt" "$short" "$long" "$repeats" "$transport" <<'PY'
import json, subprocess, sys
out, model, batches, prompt, short, long, repeats = (sys.argv[1], sys.argv[2], sys.argv[3].split(), int(sys.argv[4]),
                                                     int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]))
transports = ["grpc"] if sys.argv[8] == "grpc" else ["grpc", sys.argv[8]]
mm = sys.executable.rsplit("/", 1)[0] + "/moemesh"
print(f"{'shape':52}{'measured tok/s':>16}{'one host':>10}{'error':>8}{'apart':>9}{'error':>8}")
for transport, b in ((t, b) for t in transports for b in map(int, batches)):
    runs = {(n, r): json.load(open(f"{out}/bench-{b}-{n}-{r}.json")) for n in (short, long) for r in range(1, repeats + 1)}
    prefix = "" if transport == "grpc" else f"{transport}_"
    for key, m in ((prefix + "mesh_no_overlap_tokens_per_s", 1), (prefix + "mesh_tokens_per_s", 2)):
        t = {n: min(b * n / runs[n, r][key] for r in range(1, repeats + 1)) for n in (short, long)}  # quickest run
        measured = b * (long - short) / (t[long] - t[short])
        flags = [mm, "plan", "--cluster", "--model", model, "--profile", f"{out}/profile.json", "--attention-nodes",
                 "1", "--expert-nodes", "2", "--batch", str(b), "--micro-batches", str(m), "--context",
                 str(prompt + (short + long) // 2), "--transport", transport, "--json"]
        shared, apart = (json.loads(subprocess.check_output(flags + extra))["tokens_per_s"]
                         for extra in (["--shared-host"], []))
        shape = f"{transport}: 1 attn + 2 experts, batch {b}, {m} micro-batch{'es' if m > 1 else ''}"
        print(f"{shape:52}{measured:16.1f}{shared:10.1f}{shared / measured - 1:+8.0%}{apart:9.1f}"
              f"{apart / measured - 1:+8.0%}")
load = [open(f"{out}/load-{w}").read().strip() for w in ("before", "after")]
print(f"load average (1, 5, 15 min) before {load[0]}, after {load[1]}; {repeats} bench runs per point")
print(f"(profile and bench outputs in {out})")
PY
