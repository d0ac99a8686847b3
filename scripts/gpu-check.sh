#!/usr/bin/env bash
# gpu-check: the GPU figures of moemesh in one command, on a CUDA machine with a fresh checkout.
#
#   scripts/gpu-check.sh [--dry-run] [--only a,b,c,d,e,f] [--out DIR]
#
# Sections (each under its own `timeout`; one failing prints FAIL and the rest still run):
#   a  oracle parity on CUDA: fp32 greedy tokens identical to transformers on the same GPU, bf16 logits
#      within tolerance (scripts/gpu_parity.py over tests/oracle/hf_models.py's configs)
#   b  python -m moemesh.kernels.bench: each Triton kernel checked and timed against torch and the H200 peak
#      (V3.2's sparse decode too, on the strided latent view of [latent | indexer key] rows; a's V3.2
#      configs run the whole V3.2 path: both stores, dense and sparse decode, on CUDA)
#   c  moemesh bench --device cuda --dtype bfloat16: the engine against transformers
#   d  moemesh bench --mesh --device cuda: GPU expert nodes over gRPC (one GPU shared)
#   e  FP8 kept vs dequantized: routed-expert bytes on the GPU, peak memory, tokens/s (scripts/fp8_figures.py)
#   f  NCCL: the torch transport between two GPUs (scripts/gpu_nccl.py); skipped on one GPU
# About 8 minutes on one H200 (the timeouts below add up to that; f only runs with two GPUs).
#
# Python: VENV=DIR uses DIR/bin/python; PYTHON=EXE uses that interpreter as it is (e.g. a system python
# that already has CUDA torch, transformers and grpc); else .venv if present; else scripts/setup-venv.sh
# makes .venv (that needs a package index). Nothing else is downloaded: the check runs offline.
# Without a CUDA device it exits 2 with one line, before anything slow. Exit 1 if any section failed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NO_CUDA="gpu-check: no CUDA device visible (torch.cuda.is_available() is False); run this on a GPU machine"

dry=false
only="a,b,c,d,e,f"
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=true ;;
    --only) only="${2:?--only needs a list like a,c}"; shift ;;
    --only=*) only="${1#--only=}" ;;
    --out) out="${2:?--out needs a directory}"; shift ;;
    --out=*) out="${1#--out=}" ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see scripts/gpu-check.sh --help)" >&2; exit 2 ;;
  esac
  shift
done

# ---- the interpreter ------------------------------------------------------------------------------
if [ -n "${VENV:-}" ]; then
  py="$VENV/bin/python"; py_from="VENV=$VENV"
  if [ ! -x "$py" ] && ! $dry; then echo "gpu-check: VENV=$VENV has no bin/python" >&2; exit 2; fi
elif [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"; py_from="PYTHON=$PYTHON"
elif [ -x "$root/.venv/bin/python" ]; then
  py="$root/.venv/bin/python"; py_from=".venv"
else
  py="$root/.venv/bin/python"; py_from="new .venv (scripts/setup-venv.sh test)"
  if $dry; then
    :
  elif ! nvidia-smi -L >/dev/null 2>&1; then  # refuse before the slow venv set-up
    echo "$NO_CUDA" >&2; exit 2
  else
    bash "$root/scripts/setup-venv.sh" test
  fi
fi

if ! $dry; then
  # One line and exit 2 when there is no GPU, before anything slow (tests/unit/test_gpu_check.py).
  if ! probe="$("$py" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null)"; then
    echo "gpu-check: $py cannot import torch; set VENV=DIR or PYTHON=EXE to an interpreter with CUDA torch" >&2
    exit 2
  fi
  if [ "$probe" = 0 ]; then echo "$NO_CUDA" >&2; exit 2; fi
  gpus="$probe"
  if ! "$py" -c 'import moemesh.cli, moemesh.kernels' 2>/dev/null; then
    # A system interpreter without moemesh: install this checkout into it, offline (no dependencies).
    "$py" -m pip install --quiet --no-deps --no-build-isolation --no-index -e "$root"
  fi
  # Every section's imports, up front: a missing package is one line here, not six FAILs later.
  if ! missing="$("$py" -c '
import importlib, sys
for m in ("moemesh.cli.main", "moemesh.launch.embedded", "moemesh.kernels.bench", "transformers", "triton"):
    try:
        importlib.import_module(m)
    except ImportError as exc:
        print(f"{m} ({exc})"); sys.exit(1)' 2>/dev/null)"; then
    echo "gpu-check: $py cannot import $missing; install moemesh[test] there (offline: carry its wheels)" >&2
    exit 2
  fi
else
  gpus="N"
fi

# ---- where logs and checkpoints go ----------------------------------------------------------------
if [ -z "$out" ]; then out="${TMPDIR:-/tmp}/moemesh-gpu-check.$$"; fi
work="$out/work"
$dry || mkdir -p "$work/home"
export PYTHONUNBUFFERED=1 MOEMESH_HOME="$work/home" TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$work/triton}"
cd "$root"

moemesh=("$py" -m moemesh.cli)
model="$work/tiny-v3"  # hidden 1024, 64 experts (6 per token), 4 layers, bf16: every kernel at a real tile size
names=() states=() secs=() cmds=()

# The processes a section left behind (bench --mesh starts expert nodes in their own sessions; a timeout
# can kill bench before it stops them): every process naming this run's work dir, ended by its id.
reap_strays() {
  local pid
  for pid in $(pgrep -f -- "$work/" 2>/dev/null || true); do
    [ "$pid" != "$$" ] && kill "$pid" 2>/dev/null || true
  done
}

# section KEY LIMIT_S TITLE -- COMMAND...: print the label and the command, run it under `timeout`,
# record PASS / FAIL (rc) / TIMEOUT; never exits the script.
section() {
  local key="$1" limit="$2" title="$3"; shift 4
  case ",$only," in *",$key,"*) ;; *) return 0 ;; esac
  local shown="$*"
  echo
  echo "=== [$key] $title (timeout ${limit}s)"
  echo "\$ $shown"
  names+=("$key $title"); cmds+=("$shown")
  if $dry; then states+=("dry-run"); secs+=("-"); return 0; fi
  local start=$SECONDS rc=0
  if timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$out/$key.log"; then rc=0; else rc=$?; fi
  reap_strays
  secs+=("$((SECONDS - start))")
  case "$rc" in
    0) states+=("PASS") ;;
    124|137) states+=("TIMEOUT") ; echo "[$key] TIMEOUT after ${limit}s" ;;
    *) states+=("FAIL (rc $rc)") ; echo "[$key] FAIL (rc $rc)" ;;
  esac
}

skip() {
  local key="$1" title="$2" why="$3"
  case ",$only," in *",$key,"*) ;; *) return 0 ;; esac
  echo
  echo "=== [$key] $title"
  echo "$why"
  names+=("$key $title"); cmds+=("-"); states+=("SKIP"); secs+=("-")
}

echo "gpu-check: python $py ($py_from); GPUs: $gpus; logs and checkpoints in $out"
$dry && echo "gpu-check: dry run: the commands below are printed, not run"

# ---- the checkpoint the benches share (bf16, V3 layout; transformers loads it too) ------------------
needs_model=false
case ",$only," in *,c,*|*,d,*|*,e,*|*,f,*) needs_model=true ;; esac
if $needs_model; then
  only="$only,0"
  section 0 60 "tiny V3 checkpoint for c-f" -- "${moemesh[@]}" tiny-checkpoint "$model" --arch deepseek_v3 \
    --seed 0 --hidden-size 1024 --layers 4 --experts 64 --experts-per-token 6 --kv-lora-rank 256 \
    --vocab-size 4096 --dtype bfloat16
fi

section a 110 "oracle parity on CUDA (fp32 tokens, bf16 logits) vs transformers" -- \
  "$py" scripts/gpu_parity.py --device cuda
section b 160 "kernels: Triton vs torch vs H200 peak" -- \
  "$py" -m moemesh.kernels.bench --iters 10
section c 70 "engine vs transformers, bf16" -- \
  "${moemesh[@]}" bench --model "$model" --device cuda --dtype bfloat16 --batch 16 --prompt-len 64 --new-tokens 32
section d 100 "mesh: 2 GPU expert nodes over gRPC" -- \
  "${moemesh[@]}" bench --mesh --model "$model" --device cuda --dtype bfloat16 --batch 16 --prompt-len 32 \
  --new-tokens 16 --hop-samples 100
section e 70 "FP8 kept vs dequantized: memory and tokens/s" -- \
  "$py" scripts/fp8_figures.py --model "$model" --device cuda --dtype bfloat16
if [ "$gpus" = N ]; then
  section f 90 "NCCL: torch transport, attention on cuda:0, expert nodes on cuda:1 (runs with >= 2 GPUs)" -- \
    "$py" scripts/gpu_nccl.py --model "$model" --dtype bfloat16
elif [ "$gpus" -ge 2 ]; then
  section f 90 "NCCL: torch transport, attention on cuda:0, expert nodes on cuda:1" -- \
    "$py" scripts/gpu_nccl.py --model "$model" --dtype bfloat16
else
  skip f "NCCL" "NCCL: skipped (one GPU: NCCL refuses two ranks on one device)"
fi

# ---- summary ---------------------------------------------------------------------------------------
echo
echo "=== gpu-check summary ($out)"
printf '%-70s %-14s %6s\n' "section" "result" "s"
failed=0
for i in "${!names[@]}"; do
  printf '%-70s %-14s %6s\n' "${names[$i]}" "${states[$i]}" "${secs[$i]}"
  case "${states[$i]}" in FAIL*|TIMEOUT) failed=1 ;; esac
done
if [ "$failed" = 1 ]; then
  echo "gpu-check: some sections failed (their logs: $out/<section>.log)"
  exit 1
fi
echo "gpu-check: every section passed or was skipped"
