"""``moemesh bench --shared-prefix N``: time to first token with the prefix cache cold and warm, in one process.

A batch of ``--batch`` requests whose prompts share one random ``N``-token prefix, each followed by its
own random ``--prompt-len``-token suffix, runs greedy for ``--new-tokens`` tokens on a fresh engine
(empty cache): the *cold* run, where the batch prefills the prefix. Then a second batch with the same
prefix and new suffixes runs on the same engine: the *warm* run, which shares the prefix's cached blocks
and prefills only the suffixes. TTFT is each request's time from the batch's submission to its first
token, averaged over the batch; both runs are submitted the same way, so only the cache differs.

``prefix_tokens_match`` is true when the warm run's tokens equal the same prompts' tokens on an engine
with the cache off (same model, same engine settings). A warm-up run on unrelated prompts comes first,
so first-call allocation is not billed to the cold run. With ``--repeats`` each repeat uses a fresh
engine and new suffixes; the best (lowest) TTFT of each side is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from moemesh.sampling import SamplingParams


def _prompts(vocab: int, prefix: list[int], batch: int, suffix_len: int, seed: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [prefix + torch.randint(2, vocab, (suffix_len,), generator=gen).tolist() for _ in range(batch)]


def _run_batch(engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[list[int]], int]:
    """(mean TTFT in seconds, tokens per prompt, prompt tokens served from the cache) of one batch run."""
    hits_before = engine.blocks.prefix_hit_tokens
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    first: dict[str, float] = {}
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for ev in engine.step():
            if ev.error is not None:
                raise ev.error
            first.setdefault(ev.request_id, time.perf_counter() - start)
            tokens[ev.request_id].append(ev.token_id)
    ttft = sum(first[rid] for rid in ids) / len(ids)
    return ttft, [tokens[rid] for rid in ids], engine.blocks.prefix_hit_tokens - hits_before


def run_prefix_bench(args: argparse.Namespace) -> int:
    import torch

    from moemesh.attn_node.engine import Engine
    from moemesh.cli.generate import engine_config
    from moemesh.launch.embedded import build_local

    n = args.shared_prefix
    config = dataclasses.replace(engine_config(args), prefix_cache=True)
    mesh = build_local(args.model, args.dtype, config, progress=not args.json, kernels=args.kernels,
                       device=args.device, fp8=args.fp8)
    cfg, model, backend = mesh.cfg, mesh.engine.runner.model, mesh.engine.backend
    vocab = cfg.vocab_size
    prefix = torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    def fresh(prefix_cache: bool) -> Engine:
        return Engine(model, cfg, dataclasses.replace(config, prefix_cache=prefix_cache), backend=backend)

    _run_batch(mesh.engine, _prompts(vocab, [], args.batch, n + args.prompt_len, 999), params)  # warm-up
    cold_s, warm_s, hits, warm_prompts, warm_tokens = [], [], [], None, None
    for r in range(args.repeats):
        engine = fresh(True)
        cold, _, _ = _run_batch(engine, _prompts(vocab, prefix, args.batch, args.prompt_len, 2 * r + 1), params)
        prompts = _prompts(vocab, prefix, args.batch, args.prompt_len, 2 * r + 2)
        warm, tokens, hit = _run_batch(engine, prompts, params)
        cold_s.append(cold)
        warm_s.append(warm)
        hits.append(hit)
        if warm_prompts is None:
            warm_prompts, warm_tokens = prompts, tokens
    _, reference, _ = _run_batch(fresh(False), warm_prompts, params)
    result = {
        "batch": args.batch,
        "shared_prefix": n,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "block_size": config.block_size,
        "dtype": str(mesh.dtype).removeprefix("torch."),
        "device": str(mesh.device),
        "threads": torch.get_num_threads(),
        "ttft_cold_ms": min(cold_s) * 1000,
        "ttft_warm_ms": min(warm_s) * 1000,
        "ttft_ratio": min(cold_s) / min(warm_s),
        "prefix_hit_tokens": hits[0],
        "warm_prompt_tokens": args.batch * (n + args.prompt_len),
        "prefix_tokens_match": warm_tokens == reference,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"workload: batch {args.batch}, shared prefix {n} tokens + {args.prompt_len}-token suffixes, "
          f"{args.new_tokens} new tokens, greedy, {result['dtype']} on {result['device']}, {result['threads']} threads")
    print(f"TTFT cold {result['ttft_cold_ms']:.1f} ms, warm {result['ttft_warm_ms']:.1f} ms "
          f"({result['ttft_ratio']:.2f}x); warm run served {hits[0]}/{result['warm_prompt_tokens']} prompt tokens "
          f"from the cache; tokens equal to the cache off: {result['prefix_tokens_match']}")
    return 0
