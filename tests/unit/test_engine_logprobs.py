"""Logprobs through the engine (continuous batching over the tiny transformers-written checkpoint).

Each generated token's logprob is the log-softmax of the model's logits at its position (checked against the
engine's own prefill logits of the prompt plus the tokens before it), whatever the temperature: raw logprobs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moemesh.sampling import SamplingParams

from .test_engine import build_tiny_model, engine, greedy, prompts_of


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-logprobs"), "v2")


def position_logprobs(eng, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: log-softmax of the logits that predicted each token, from one prefill."""
    logits = eng.prompt_logits(prompt + tokens[:-1])[len(prompt) - 1 :]
    return torch.log_softmax(logits, dim=-1)


def test_greedy_top1_is_the_sampled_token_and_every_logprob_is_the_models(tiny):
    eng = engine(tiny, max_num_batched_tokens=8, block_size=4)  # chunked prefill and decode in the same steps
    prompts = prompts_of((3, 9, 5))
    outs = eng.generate(prompts, greedy(6, logprobs=5))
    for prompt, out in zip(prompts, outs):
        assert [lp.token_id for lp in out.logprobs] == out.token_ids
        ref = position_logprobs(eng, prompt, out.token_ids)
        for i, lp in enumerate(out.logprobs):
            assert len(lp.top) == 5
            assert lp.top[0] == (lp.token_id, lp.logprob)  # greedy: the sampled token is the most likely
            assert lp.logprob == pytest.approx(ref[i, lp.token_id].item(), abs=1e-4)
            values, ids = torch.topk(ref[i], 5)
            assert [t for t, _ in lp.top] == ids.tolist()
            assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_logprobs_are_raw_unchanged_by_temperature(tiny):
    (prompt,) = prompts_of([7], seed=2)
    (cold,) = engine(tiny).generate([prompt], greedy(6, logprobs=3))
    # top_k=1 draws the argmax at any temperature: the same tokens, so the same positions to compare.
    (hot,) = engine(tiny).generate([prompt], SamplingParams(max_tokens=6, temperature=5.0, top_k=1, seed=1,
                                                            ignore_eos=True, logprobs=3))
    assert hot.token_ids == cold.token_ids
    for a, b in zip(cold.logprobs, hot.logprobs):
        assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_sampled_tokens_get_their_own_logprob_and_rows_without_logprobs_get_none(tiny):
    eng = engine(tiny)
    prompts = prompts_of((4, 6, 5), seed=3)
    sampled = SamplingParams(max_tokens=8, temperature=1.5, seed=5, ignore_eos=True)
    params = [dataclasses.replace(sampled, logprobs=0), greedy(8), dataclasses.replace(sampled, seed=6, logprobs=20)]
    outs = eng.generate(prompts, params)
    plain = engine(tiny).generate(prompts, [dataclasses.replace(p, logprobs=None) for p in params])
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]  # asking does not change what is sampled
    assert outs[1].logprobs == [] and all(o.logprobs == [] for o in plain)
    for prompt, out, k in ((prompts[0], outs[0], 0), (prompts[2], outs[2], 20)):
        ref = position_logprobs(eng, prompt, out.token_ids)
        assert [lp.token_id for lp in out.logprobs] == out.token_ids
        assert [len(lp.top) for lp in out.logprobs] == [k] * len(out.token_ids)
        assert [lp.logprob for lp in out.logprobs] == pytest.approx(
            [ref[i, t].item() for i, t in enumerate(out.token_ids)], abs=1e-4)


def test_a_resumed_request_has_logprobs_for_its_new_tokens_only(tiny):
    (prompt,) = prompts_of([6], seed=4)
    (full,) = engine(tiny).generate([prompt], greedy(8, logprobs=2))
    eng = engine(tiny)
    eng.add_request(prompt + full.token_ids[:3], greedy(5, logprobs=2), resumed=3)
    events = []
    while eng.has_unfinished():
        events += eng.step()
    assert [ev.token_id for ev in events] == full.token_ids[3:]
    assert [ev.logprobs.token_id for ev in events] == full.token_ids[3:]
    assert [ev.logprobs.logprob for ev in events] == pytest.approx([lp.logprob for lp in full.logprobs[3:]], abs=1e-4)
