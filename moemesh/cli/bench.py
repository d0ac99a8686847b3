"""``moemesh bench``: the same greedy workload through transformers and through moemesh, in one run.

Figures are printed side by side because these machines are noisy: only the
ratio from one run means much. Both sides run the same checkpoint in the same
dtype, on the same random prompts, for exactly ``--new-tokens`` tokens (EOS is
ignored on both sides), and the tokens are compared.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from typing import TYPE_CHECKING

from moemesh.argtypes import positive_int
from moemesh.cli import flags
from moemesh.cli.bench_serving import add_serving_args
from moemesh.sampling import SamplingParams
from moemesh.errors import MoemeshError
from moemesh.logs import get_logger

if TYPE_CHECKING:
    import torch

log = get_logger("moemesh.bench")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="tokens/s of transformers and of moemesh on the same workload",
                              description="Run the same greedy workload (random prompts) through transformers' generate "
                              "and through the moemesh engine in one run; print tokens/s of each, the ratio, whether the "
                              "tokens agree, the latent cache bytes per token next to what MHA would need, and the "
                              "bandwidth roofline: the weight bytes a decode step reads (the dense weights and the "
                              "routed experts its routing hit), the streaming-read bandwidth measured in the same run "
                              "with the same threads, and the fraction of it the engine's decode steps reach. Both "
                              "run on --device in --dtype (--dtype bfloat16: transformers too). Needs transformers "
                              "(pip install 'moemesh[bench]'). --mesh and --serving are other benchmarks, on the same "
                              "flags where they apply.")
    flags.add_model_arg(p, required=False)
    p.add_argument("--batch", type=positive_int, default=16, help="prompts run together (default: 16)")
    p.add_argument("--prompt-len", type=positive_int, default=32, help="tokens per prompt (default: 32)")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="tokens generated per prompt (default: 32)")
    p.add_argument("--repeats", type=positive_int, default=1, help="timed runs per side; the best counts")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="print one JSON object with the figures instead of the table; --json FILE writes it to "
                   "FILE and prints the table too")
    p.add_argument("--mesh", action="store_true",
                   help="instead: start 2 expert node processes on loopback and compare the single process with "
                   "the mesh (micro-batch overlap on, off and auto), and one dispatch hop with a raw TCP echo "
                   "of the same bytes and the kernel's floor for them (C ping-pongs, spinning and blocking)")
    p.add_argument("--hop-samples", type=positive_int, default=300, help="round trips timed for the hop (--mesh)")
    p.add_argument("--shared-prefix", type=positive_int, default=None, metavar="N",
                   help="instead: --batch prompts sharing an N-token prefix (then --prompt-len distinct tokens each), "
                   "TTFT with the prefix cache cold and warm, and whether the warm tokens equal the cache off "
                   "(moemesh/cli/bench_prefix.py)")
    flags.add_transport_arg(p, "bench")
    flags.add_engine_args(p)
    flags.add_threads_arg(p, "this process: both sides and the streaming read (--mesh: its single process; "
                          "--serving: refused)")
    add_serving_args(p)
    return p


def emit_json(args: argparse.Namespace, result: dict) -> bool:
    """``--json``: print ``result`` (True: the caller prints nothing else) or, ``--json FILE``, write it there."""
    if args.json == "-":
        print(json.dumps(result))
        return True
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    return False


def _load_hf(model_dir: str, dtype: torch.dtype, device: torch.device):
    """transformers' model of ``model_dir``; an FP8 checkpoint's dequantized twin (transformers' FP8 path needs a
    GPU and accelerate), written once to a temporary directory: the same weights moemesh dequantizes or keeps."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise MoemeshError("bench compares against transformers: pip install 'moemesh[bench]'") from None
    from moemesh.model.checkpoint import write_dequantized
    from moemesh.model.config import ModelConfig

    if ModelConfig.from_dir(model_dir).quant is None:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    with tempfile.TemporaryDirectory(prefix="moemesh-bench-") as tmp:
        log.info("bench_transformers_dequantized", model=model_dir, twin=tmp,
                 why="transformers runs an FP8 checkpoint's dequantized twin")
        twin = write_dequantized(model_dir, Path(tmp) / "twin")
        return AutoModelForCausalLM.from_pretrained(twin, dtype=dtype).to(device).eval()


def _time_best(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run(args: argparse.Namespace) -> int:
    if args.serving:
        if args.mesh:
            raise flags.UsageError("--mesh and --serving are two benchmarks: give one")
        if args.threads is not None:
            raise flags.UsageError("--threads sets this process's torch threads, and --serving computes in other "
                                   "processes: start the mesh with `moemesh up --threads N`")
        from moemesh.cli.bench_serving import run_serving

        return run_serving(args)
    if args.router or args.http or args.baseline:
        raise flags.UsageError("--router, --http and --baseline belong to the serving benchmark: add --serving")
    flags.apply_threads(args.threads)
    if not args.model:
        from moemesh.launch.embedded import ensure_demo_model

        args.model = str(ensure_demo_model())
    if args.mesh:
        from moemesh.cli.bench_mesh import run_mesh_bench

        return run_mesh_bench(args)
    if args.shared_prefix is not None:
        from moemesh.cli.bench_prefix import run_prefix_bench

        return run_prefix_bench(args)
    return _run_bench(args)


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from moemesh.cli.bench_roofline import (attach_hits, compute_figures, matmul_gflops, print_roofline,
                                            roofline_figures, run_metered, stream_gbps)
    from moemesh.cli.generate import engine_config
    from moemesh.launch.embedded import build_local
    from moemesh.model.step_flops import step_flops
    from moemesh.model.weight_bytes import weight_bytes
    from moemesh.devices import compute_dtype

    torch.manual_seed(0)
    mesh = build_local(args.model, args.dtype, engine_config(args), progress=not args.json, kernels=args.kernels,
                       device=args.device, fp8=args.fp8)
    cfg, engine, dtype, device = mesh.cfg, mesh.engine, mesh.dtype, mesh.device
    hf = _load_hf(args.model, dtype, device)  # the same device and dtype as the engine
    prompts = torch.randint(2, cfg.vocab_size, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    hf_prompts = prompts.to(device)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    def run_hf(n_new: int):
        with torch.inference_mode():
            out = hf.generate(hf_prompts, attention_mask=torch.ones_like(hf_prompts), do_sample=False,
                              max_new_tokens=n_new, eos_token_id=None, pad_token_id=0)
        return out[:, args.prompt_len:].tolist()

    hits = attach_hits(engine.runner.model, cfg)  # the experts each decode step's routing hits, on the device
    run_hf(2)  # warm-up: first calls allocate and pick kernels
    run_metered(engine, hits, prompts.tolist(), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    hf_s, hf_tokens = _time_best(lambda: run_hf(args.new_tokens), args.repeats)
    # here, with the engine's threads: the bound its step is held to. Before and after each run, the best: a shared
    # host's bandwidth moves from one second to the next (31-58 GB/s on one VM), and the bound is the most it gives
    gbps, runs = stream_gbps(device), []
    for _ in range(args.repeats):
        runs.append(run_metered(engine, hits, prompts.tolist(), params))
        gbps = max(gbps, stream_gbps(device))
    best = min(runs, key=lambda r: r.seconds)
    en_s, en_tokens = best.seconds, best.tokens
    name = str(dtype).removeprefix("torch.")
    act_dtype = compute_dtype(dtype, device)  # the activations' (moemesh/devices.py)
    compute = str(act_dtype).removeprefix("torch.")
    roofline = roofline_figures(weight_bytes(cfg, name, _kept_fp8_block(mesh), compute),
                                best, gbps, len(cfg.moe_layers))
    # the other ceiling: a decode step's FLOPs (its mean context cached) at the device's matmul rate in the
    # activations' dtype, which binds instead of the bytes once the batch is large enough
    flops = step_flops(cfg, args.batch, args.prompt_len + args.new_tokens / 2)
    roofline |= compute_figures(flops, matmul_gflops(device, act_dtype), roofline["decode_step_ms"])
    generated = args.batch * args.new_tokens
    # the latent cache holds activations: fp32 on CPU also over bf16 weights (moemesh/devices.py)
    elem = torch.tensor([], dtype=act_dtype).element_size()
    result = {
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "dtype": name,
        "compute_dtype": compute,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "hf_tokens_per_s": generated / hf_s,
        "engine_tokens_per_s": generated / en_s,
        "ratio": hf_s / en_s,
        "tokens_match": sum(a == b for a, b in zip(hf_tokens, en_tokens)),
        "latent_cache_bytes_per_token_per_layer": cfg.kv_cache_dim * elem,
        "mha_cache_bytes_per_token_per_layer": cfg.mha_cache_dim * elem,
        "latent_cache_bytes_per_token": cfg.kv_cache_dim * elem * cfg.num_hidden_layers,
        "mha_cache_bytes_per_token": cfg.mha_cache_dim * elem * cfg.num_hidden_layers,
        # V3.2's indexer keys, cached beside the latent in the same rows (0 for V2/V3).
        "indexer_cache_bytes_per_token_per_layer": cfg.index_cache_dim * elem,
        "indexer_cache_bytes_per_token": cfg.index_cache_dim * elem * cfg.num_hidden_layers,
        **roofline,
    }
    if emit_json(args, result):
        return 0
    print(f"workload: batch {args.batch}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"greedy, {result['dtype']} on {result['device']}, {result['threads']} threads")
    print(f"{'':14}{'tokens/s':>12}{'seconds':>10}")
    print(f"{'transformers':14}{result['hf_tokens_per_s']:12.1f}{hf_s:10.3f}")
    print(f"{'moemesh':14}{result['engine_tokens_per_s']:12.1f}{en_s:10.3f}")
    print(f"ratio moemesh/transformers: {result['ratio']:.2f}x; identical tokens for "
          f"{result['tokens_match']}/{args.batch} prompts")
    print(f"KV cache per token: latent {result['latent_cache_bytes_per_token']} B vs MHA "
          f"{result['mha_cache_bytes_per_token']} B ({result['mha_cache_bytes_per_token'] / result['latent_cache_bytes_per_token']:.1f}x smaller)")
    if cfg.has_indexer:
        print(f"indexer keys per token (beside the latent): {result['indexer_cache_bytes_per_token']} B")
    print_roofline(result, args.batch, cfg.n_routed_experts, result["threads"])
    return 0


def _kept_fp8_block(mesh) -> tuple[int, int] | None:
    """The FP8 scale block when the in-process shard keeps the routed experts e4m3, else None."""
    shard = getattr(mesh.engine.backend, "shard", None)
    return getattr(shard, "fp8_block", None)
