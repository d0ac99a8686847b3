"""Logprobs of sampled tokens (attn_node/logprobs.py through sampler.sample_step): exact values on fixed logits.

The expected values are torch.log_softmax / torch.topk of the same fp32 logits, row by row: raw logprobs,
before temperature and filters, whatever the row's sampling.
"""

from __future__ import annotations

import pytest
import torch

from moemesh.attn_node.logprobs import TokenLogprobs, logprob_block, pack, unpack
from moemesh.attn_node.sampler import sample, sample_step
from moemesh.sampling import MAX_LOGPROBS, SamplingParams

VOCAB = 50


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fixed_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=gen(seed)) * 3


def expected(row: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    """What a row's record must hold, from torch itself on the one row."""
    logp = torch.log_softmax(row, dim=-1)
    values, ids = torch.topk(logp, k)
    return TokenLogprobs(token, logp[token].item(), tuple(zip(ids.tolist(), values.tolist())))


# greedy and sampled rows, k = 0, 3, 20 (the most), rows that did not ask, all in one batch
MIXED = [
    SamplingParams(temperature=0.0, logprobs=3),
    SamplingParams(temperature=0.8, top_k=5, logprobs=MAX_LOGPROBS),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.3, top_p=0.7, logprobs=0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.0, logprobs=MAX_LOGPROBS),
]


def generators(params: list[SamplingParams]) -> list[torch.Generator | None]:
    return [None if p.greedy else gen(i) for i, p in enumerate(params)]


def test_mixed_batch_gets_exact_logprobs_for_the_rows_that_asked():
    logits = fixed_logits(len(MIXED))
    tokens, records = sample_step(logits, MIXED, generators(MIXED))
    assert tokens == sample(logits, MIXED, generators(MIXED))  # the same draws as without logprobs
    for i, p in enumerate(MIXED):
        if p.logprobs is None:
            assert records[i] is None
            continue
        want = expected(logits[i], tokens[i], p.logprobs)
        got = records[i]
        assert got.token_id == tokens[i] and len(got.top) == p.logprobs
        assert [t for t, _ in got.top] == [t for t, _ in want.top]  # most likely first
        assert got.logprob == pytest.approx(want.logprob, abs=1e-6)
        assert [v for _, v in got.top] == pytest.approx([v for _, v in want.top], abs=1e-6)
    assert all(isinstance(t, int) for t in tokens)


def test_k_zero_has_the_sampled_logprob_and_no_alternatives():
    logits = fixed_logits(2, seed=1)
    params = [SamplingParams(temperature=0.0, logprobs=0)] * 2
    tokens, records = sample_step(logits, params, [None, None])
    assert [r.top for r in records] == [(), ()]
    assert [r.logprob for r in records] == pytest.approx(
        [torch.log_softmax(logits[i], -1).max().item() for i in range(2)], abs=1e-6)


def test_greedy_top1_is_the_sampled_token_with_the_same_logprob():
    logits = fixed_logits(4, seed=2)
    params = [SamplingParams(temperature=0.0, logprobs=5)] * 4
    tokens, records = sample_step(logits, params, [None] * 4)
    for token, rec in zip(tokens, records):
        assert rec.top[0] == (token, rec.logprob)
        assert [v for _, v in rec.top] == sorted((v for _, v in rec.top), reverse=True)


def test_logprobs_are_raw_whatever_the_temperature_and_filters():
    logits = fixed_logits(1, seed=3)
    token = sample(logits, [SamplingParams(temperature=0.0)], [None])[0]
    base = SamplingParams(temperature=0.0, logprobs=4)
    hot = SamplingParams(temperature=50.0, top_k=1, logprobs=4)  # top_k=1: draws the argmax as well
    (_, (cold,)), (_, (warm,)) = sample_step(logits, [base], [None]), sample_step(logits, [hot], [gen(0)])
    assert cold.token_id == warm.token_id == token
    assert cold == warm  # neither the temperature nor the filter changed a logprob


def test_no_row_asking_computes_nothing_and_reads_the_ids_as_before():
    logits = fixed_logits(3, seed=4)
    params = [SamplingParams(temperature=0.0)] * 3
    tokens = logits.argmax(-1)
    assert logprob_block(logits, tokens, params) is None
    assert pack(tokens, None) is tokens  # no extra tensor, ints as before
    assert sample_step(logits, params, [None] * 3) == (tokens.tolist(), [None, None, None])


def test_pack_is_one_float64_tensor_of_ids_then_rows():
    logits = fixed_logits(3, seed=5)
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, logprobs=1)]
    tokens = logits.argmax(-1)
    packed = pack(tokens, logprob_block(logits, tokens, params))
    width = 1 + 2 * 2  # the widest k asked
    assert packed.dtype == torch.float64 and tuple(packed.shape) == (3 + 2 * width,)
    assert packed[:3].tolist() == tokens.tolist()
    ids, records = unpack(packed.tolist(), params, VOCAB)
    assert ids == tokens.tolist() and records[1] is None
    assert len(records[0].top) == 2 and len(records[2].top) == 1  # each row keeps its own k
    want = expected(logits[2], ids[2], 1)
    assert records[2].top[0][0] == want.top[0][0] == ids[2]
    assert records[2].logprob == pytest.approx(want.logprob, abs=1e-6)


def test_ids_of_a_large_vocabulary_survive_the_float_packing():
    vocab = 129_280  # DeepSeek-V3's
    logits = torch.full((1, vocab), -10.0)
    logits[0, vocab - 1] = 5.0
    logits[0, vocab - 3] = 4.0
    tokens, (rec,) = sample_step(logits, [SamplingParams(temperature=0.0, logprobs=2)], [None])
    assert tokens == [vocab - 1]
    assert [t for t, _ in rec.top] == [vocab - 1, vocab - 3]


def test_k_larger_than_the_vocabulary_is_clamped():
    logits = fixed_logits(1, seed=6)[:, :5]
    _, (rec,) = sample_step(logits, [SamplingParams(temperature=0.0, logprobs=MAX_LOGPROBS)], [None])
    assert len(rec.top) == 5
