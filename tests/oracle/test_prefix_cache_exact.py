"""The prefix cache changes nothing a request computes: tokens and logits equal with the cache on and off.

On every oracle config (tests/oracle/hf_models.py), one engine with the prefix cache and one without,
over the same model, run the same requests in the same order: prompts sharing a prefix that ends
inside a block, a prompt entirely cached (its last block recomputed), greedy and seeded sampling,
a cache small enough that cached blocks are evicted and the prefix computed again, and a resumed
request (resume_token_ids) on a warm cache. Tokens must be equal; every sampled row of logits equal to
fp32 rounding (1e-5, as absorbed == naive MLA in tests/unit/test_engine.py), not bit for bit: the
engine is not batch-invariant (a GEMM over 9 prompt rows does not round exactly as one over 29, and
continuous batching changes the batch every step with or without the cache), and cache-off logits
measured here differ from cache-on ones by ~1e-6 on values of ~5.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moemesh.attn_node.engine import Engine, EngineConfig
from moemesh.launch.embedded import build_local
from moemesh.sampling import SamplingParams

from .hf_models import CONFIGS, save_hf_model

pytestmark = pytest.mark.oracle

BLOCK = 4
# Small blocks and a small step budget: block tables, chunked prefill and partial blocks are exercised.
CONFIG = EngineConfig(block_size=BLOCK, max_num_batched_tokens=24, max_num_seqs=8, kv_cache_tokens=192)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def engines(request, tmp_path_factory) -> tuple[Engine, Engine]:
    path = tmp_path_factory.mktemp(request.param)
    save_hf_model(request.param, path)
    mesh = build_local(path, "float32", CONFIG, progress=False)
    runner = mesh.engine.runner
    off = Engine(runner.model, mesh.cfg, dataclasses.replace(CONFIG, prefix_cache=False), backend=mesh.engine.backend)
    return mesh.engine, off


def recorded(eng: Engine) -> dict[str, list[torch.Tensor]]:
    """Record every sampled row of logits per request (wraps the engine's model run)."""
    rows: dict[str, list[torch.Tensor]] = {}
    run_model = eng._run_model

    def wrapper(scheduled, micro_batches=1):
        logits, retried = run_model(scheduled, micro_batches)
        for item, row in zip([it for it in scheduled if it.samples], logits):
            rows.setdefault(item.seq.request_id, []).append(row.clone())
        return logits, retried

    eng._run_model = wrapper
    return rows


def run(eng: Engine, requests: list[tuple[str, list[int], SamplingParams, int]]) -> dict[str, list[int]]:
    """Add ``requests`` (id, prompt, params, resumed) together and run them to the end."""
    out: dict[str, list[int]] = {}
    for rid, prompt, params, resumed in requests:
        eng.add_request(prompt, params, request_id=rid, resumed=resumed)
    while eng.has_unfinished():
        for ev in eng.step():
            assert ev.error is None, ev.error
            out.setdefault(ev.request_id, []).append(ev.token_id)
    return out


def assert_same_logits(on: list[torch.Tensor], off: list[torch.Tensor], rid: str) -> None:
    assert len(on) == len(off), rid
    for step, (a, b) in enumerate(zip(on, off)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{rid} step {step}: {m}")


def ids(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_tokens_and_logits_equal_with_the_cache_on_and_off(engines):
    on, off = engines
    vocab = on.cfg.vocab_size
    prefix = ids(vocab, 22, 1)  # 5 full blocks and half of a sixth
    greedy = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=9, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    waves = [
        [("cold", prefix + ids(vocab, 5, 2), greedy, 0)],
        [
            ("warm", prefix + ids(vocab, 7, 3), greedy, 0),  # shares the 5 full blocks; the 6th is half shared
            ("warm-seeded", prefix + ids(vocab, 3, 4), seeded, 0),
            ("inside", prefix[:10] + ids(vocab, 9, 5), seeded, 0),  # the shared prefix ends inside block 3
            ("whole", prefix[:20], greedy, 0),  # every block cached: the last one is recomputed
            ("other", ids(vocab, 13, 6), greedy, 0),
        ],
        [("again", prefix + ids(vocab, 5, 2), seeded, 0)],  # cold's prompt, now from cache, sampled
    ]
    logits_on, logits_off = recorded(on), recorded(off)
    hits_before = on.blocks.prefix_hit_tokens
    for wave in waves:
        assert run(on, wave) == run(off, wave)
    assert on.blocks.prefix_hit_tokens - hits_before >= 5 * BLOCK * 2 + 2 * BLOCK + 4 * BLOCK
    assert off.blocks.prefix_hit_tokens == 0
    assert logits_on.keys() == logits_off.keys()
    for rid in logits_on:
        assert_same_logits(logits_on[rid], logits_off[rid], rid)


@pytest.mark.slow
def test_exact_after_eviction_and_reuse(engines):
    on, off = engines
    vocab = on.cfg.vocab_size
    prefix = ids(vocab, 24, 11)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    evicted_before = on.blocks.evicted_blocks
    logits_on, logits_off = recorded(on), recorded(off)
    for i in range(3):  # distinct prompts, 12 blocks each, together more than the 48 blocks: old cached blocks go
        wave = [(f"fill-{i}-{j}", ids(vocab, 40, 100 + 4 * i + j), greedy, 0) for j in range(4)]
        assert run(on, wave) == run(off, wave)
        if i == 0:
            first = [("prefix-0", prefix + ids(vocab, 3, 12), greedy, 0)]
            assert run(on, first) == run(off, first)
    assert on.blocks.evicted_blocks > evicted_before
    reuse = [("prefix-1", prefix + ids(vocab, 5, 13), greedy, 0), ("prefix-2", prefix + ids(vocab, 2, 14), greedy, 0)]
    assert run(on, reuse) == run(off, reuse)
    run_ids = ["prefix-0", "prefix-1", "prefix-2"]
    for rid in run_ids:
        assert_same_logits(logits_on[rid], logits_off[rid], rid)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=0.8, seed=3, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_resume_on_a_warm_cache_gives_the_fault_free_tokens(engines, params):
    on, off = engines
    prompt = ids(on.cfg.vocab_size, 17, 21)
    full = run(off, [("full", prompt, params, 0)])["full"]
    run(on, [("warmup", prompt, params, 0)])  # the prompt's blocks are cached on this node
    k = 4  # a failed node had streamed the first k tokens; the router resumes with them
    rest = dataclasses.replace(params, max_tokens=params.max_tokens - k)
    hits_before = on.blocks.prefix_hit_tokens
    resumed = run(on, [("resumed", prompt + full[:k], rest, k)])["resumed"]
    assert on.blocks.prefix_hit_tokens - hits_before == 16  # the prompt's 4 full blocks
    assert full[:k] + resumed == full
