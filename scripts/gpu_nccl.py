"""NCCL for real: the torch transport between an attention engine on one GPU and expert nodes on others.

    python scripts/gpu_nccl.py --model DIR [--dtype bfloat16] [--attn-device cuda:0] [--batch 16] ...

Needs two CUDA devices (NCCL refuses two ranks on one device). The attention side runs in this process
on --attn-device; two expert node processes (``moemesh expert-node --transport torch --device cuda:J``)
hold half the routed experts each, on the other GPUs in turn. Reports, for the torch transport and for
gRPC side by side: tokens/s, whether the tokens equal the single process's on --attn-device, and for
torch the pair groups' backend (must be nccl; gloo with --attn-device cpu) and the messages that fell back to gRPC (must be 0).
Exit 1 if any of those does not hold.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from gpu_common import device_kwargs, synchronize

from moemesh.attn_node.engine import EngineConfig
from moemesh.launch.embedded import build_local, build_remote
from moemesh.launch.procs import spawn_expert_nodes
from moemesh.sampling import SamplingParams


def _generate(mesh, prompts, params, device: str) -> tuple[float, list[list[int]]]:
    mesh.engine.generate(prompts, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # warm-up
    synchronize(device)
    start = time.perf_counter()
    tokens = [o.token_ids for o in mesh.engine.generate(prompts, params)]
    synchronize(device)
    return len(prompts) * params.max_tokens / (time.perf_counter() - start), tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_nccl.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--attn-device", default="cuda:0", help="cuda:N; cpu runs everything on the CPU over gloo "
                   "(checks this script, not NCCL)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    if args.attn_device == "cpu":  # the script's own plumbing, on a machine without GPUs: gloo, not NCCL
        others, expect = ["cpu"], "gloo"
    else:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < 2:
            print(f"NCCL: skipped ({count} GPU(s): NCCL refuses two ranks on one device)")
            return 0
        attn = torch.device(args.attn_device)
        others, expect = [f"cuda:{i}" for i in range(count) if i != attn.index], "nccl"
    econf = EngineConfig(max_num_seqs=max(64, args.batch))
    local = build_local(args.model, args.dtype, econf, False, **device_kwargs(build_local, args.attn_device))
    cfg = local.cfg
    half = cfg.n_routed_experts // 2
    specs = [f"0-{half - 1}", f"{half}-{cfg.n_routed_experts - 1}"]
    prompts = torch.randint(2, cfg.vocab_size, (args.batch, args.prompt_len),
                            generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    local_tps, local_tokens = _generate(local, prompts, params, args.attn_device)
    local.close()
    print(f"workload: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, "
          f"{args.dtype}; attention on {args.attn_device}, expert nodes on {others[0]} and {others[1 % len(others)]}")
    print(f"{'':28}{'tokens/s':>10}  tokens = single process")
    print(f"{'single process':28}{local_tps:10.1f}  -")
    failed = False
    with tempfile.TemporaryDirectory(prefix="moemesh-nccl-") as logs:
        nodes = []
        try:
            for i, spec in enumerate(specs):  # one call per node: each gets its own GPU
                nodes += spawn_expert_nodes(args.model, [spec], log_dir=logs, extra_args=[
                    "--transport", "torch", "--device", others[i % len(others)], "--dtype", args.dtype])
            node_list = [(n.address, n.spec) for n in nodes]
            for transport in ("torch", "grpc"):
                mesh = build_remote(args.model, node_list, args.dtype, econf, False, transport=transport,
                                    **device_kwargs(build_remote, args.attn_device))
                try:
                    note = ""
                    if transport == "torch":
                        for link in mesh.remote.links:
                            if not link.wait_ready(60):
                                raise RuntimeError(f"torch transport to {link.address} did not come up: "
                                                   f"{link.pair.failure}")
                    tps, tokens = _generate(mesh, prompts, params, args.attn_device)
                    same = tokens == local_tokens
                    failed |= not same
                    if transport == "torch":
                        backends = sorted({link.pair.backend for link in mesh.remote.links})
                        fallbacks = sum(link.fallback_messages for link in mesh.remote.links)
                        messages = sum(link.pair.messages for link in mesh.remote.links)
                        failed |= backends != [expect] or fallbacks > 0
                        note = f"; backend {','.join(backends)}, {messages} messages, {fallbacks} fell back to gRPC"
                    print(f"{f'mesh {transport}':28}{tps:10.1f}  {'yes' if same else 'NO'}{note}")
                finally:
                    mesh.close()
        finally:
            for node in nodes:
                node.stop()
    print(f"NCCL: {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
