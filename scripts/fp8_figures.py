"""FP8 routed experts kept as e4m3 against dequantized at load: memory and tokens/s, on one checkpoint.

    python scripts/fp8_figures.py --model DIR [--device cuda] [--dtype bfloat16] [--modes keep,dequant] [--json]

DIR is an FP8 block-quantized checkpoint (DeepSeek-V3's layout); a plain one is first copied to an FP8
twin (moemesh/model/checkpoint.py write_fp8_twin) in a temporary directory. Each mode runs in a fresh
child process (so the CUDA allocator's peak is that mode's alone) through
``build_local(..., device=, fp8=MODE)``, and reports:
  routed_expert_bytes   bytes of every tensor the expert shard holds on the device (weights and scales)
  resident_bytes        torch.cuda.memory_allocated after loading (everything on the device)
  peak_bytes            torch.cuda.max_memory_allocated over loading and the timed generation
  tokens_per_s          greedy decode, --batch prompts of --prompt-len tokens, --new-tokens each
and whether the two modes' greedy tokens agree (reported, not required: e4m3 dequantized in the kernel
and at load are the same values, but the kernels' sums may round differently). On the CPU the memory
figures of the CUDA allocator are absent (null). Exit 1 if a mode failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_common import device_kwargs, synchronize

MODES = ("keep", "dequant")


def _shard_bytes(backend, device) -> int:
    """Bytes of the tensors the expert shard holds on ``device``, whatever fields the FP8 layout adds."""
    import torch

    shard = getattr(backend, "shard", None)
    if shard is None:
        raise SystemExit(f"{type(backend).__name__} has no .shard: cannot count the routed experts' bytes")
    total = 0
    for layer in shard._layers.values():  # one record per MoE layer: w13, w2 (and scales when kept FP8)
        for t in vars(layer).values():
            if isinstance(t, torch.Tensor) and t.device == device:
                total += t.numel() * t.element_size()
    return total


def run_one(args) -> dict:
    """One mode in this process: load, count, warm up, time; the result as a dict."""
    import torch

    from moemesh.attn_node.engine import EngineConfig
    from moemesh.launch.embedded import build_local
    from moemesh.sampling import SamplingParams

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    mesh = build_local(args.model, args.dtype, EngineConfig(max_num_seqs=max(64, args.batch)), False, "auto",
                       **device_kwargs(build_local, args.device, args.one))
    device = torch.device(args.device) if args.device != "cuda" else torch.device("cuda", torch.cuda.current_device())
    resident = torch.cuda.memory_allocated() if cuda else None
    prompts = torch.randint(2, mesh.cfg.vocab_size, (args.batch, args.prompt_len),
                            generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    mesh.engine.generate(prompts, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # warm-up
    synchronize(args.device)
    start = time.perf_counter()
    tokens = [o.token_ids for o in mesh.engine.generate(prompts, params)]
    synchronize(args.device)
    seconds = time.perf_counter() - start
    result = {
        "mode": args.one, "device": str(device), "dtype": args.dtype,
        "routed_expert_bytes": _shard_bytes(mesh.engine.backend, device),
        "resident_bytes": resident, "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "tokens_per_s": args.batch * args.new_tokens / seconds, "tokens": tokens,
    }
    mesh.close()
    return result


def _fp8_model(model: Path, tmp: str) -> Path:
    from moemesh.model.checkpoint import write_fp8_twin

    config = json.loads((model / "config.json").read_text())
    if config.get("quantization_config"):
        return model
    return write_fp8_twin(model, Path(tmp) / f"{model.name}-fp8")


def _child(args, model: Path, mode: str) -> dict:
    argv = [sys.executable, __file__, "--model", str(model), "--device", args.device, "--dtype", args.dtype,
            "--batch", str(args.batch), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
            "--one", mode]
    out = subprocess.run(argv, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"mode": mode, "error": f"exit {out.returncode}: {tail}"}
    return json.loads(lines[-1])


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/fp8_figures.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="checkpoint dir (plain ones get an FP8 twin first)")
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (default: cuda)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="compute dtype; dequant converts the experts to it (default: bfloat16)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated of keep,dequant (default: both)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true", help="one JSON object per mode")
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # the child: run one mode here
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return 0
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        p.error(f"--modes takes keep and/or dequant, got {args.modes!r}")
    with tempfile.TemporaryDirectory(prefix="moemesh-fp8-") as tmp:
        model = _fp8_model(args.model, tmp)
        results = [_child(args, model, mode) for mode in modes]
    ok = [r for r in results if "error" not in r]
    if args.json:
        for r in results:
            print(json.dumps({k: v for k, v in r.items() if k != "tokens"}))
    else:
        print(f"FP8 routed experts on {args.device}, compute {args.dtype}: batch {args.batch}, prompt "
              f"{args.prompt_len}, {args.new_tokens} new tokens, greedy ({model.name})")
        print(f"{'--fp8':<9}{'routed experts MiB':>20}{'resident MiB':>14}{'peak MiB':>10}{'tokens/s':>10}")
        for r in results:
            if "error" in r:
                print(f"{r['mode']:<9}FAIL {r['error']}")
                continue
            print(f"{r['mode']:<9}{_mib(r['routed_expert_bytes']):>20}{_mib(r['resident_bytes']):>14}"
                  f"{_mib(r['peak_bytes']):>10}{r['tokens_per_s']:>10.1f}")
        by = {r["mode"]: r for r in ok}
        if {"keep", "dequant"} <= set(by):
            keep, deq = by["keep"], by["dequant"]
            same = sum(a == b for a, b in zip(keep["tokens"], deq["tokens"]))
            ratio = keep["routed_expert_bytes"] / max(1, deq["routed_expert_bytes"])
            print(f"keep/dequant: routed-expert bytes {ratio:.2f}x, tokens/s "
                  f"{keep['tokens_per_s'] / deq['tokens_per_s']:.2f}x; identical greedy tokens for "
                  f"{same}/{args.batch} prompts")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
