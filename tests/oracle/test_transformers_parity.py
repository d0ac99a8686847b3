"""The single-process engine against Hugging Face transformers on the same checkpoint.

Checkpoints are written by transformers itself (``save_pretrained``) and read by
moemesh's own loader. Prefill logits must agree to fp32 tolerance; greedy
generation of several prompts of different lengths, batched together in one
engine, must give exactly transformers' tokens for each prompt.
"""

from __future__ import annotations

import pytest
import torch

from moemesh.attn_node.engine import EngineConfig
from moemesh.sampling import SamplingParams
from moemesh.launch.embedded import build_local

from .hf_models import CONFIGS, assert_greedy_tokens_match, assert_prefill_logits_match, save_hf_model

pytestmark = pytest.mark.oracle

NEW_TOKENS = 32
PROMPT_LENGTHS = (5, 13, 30)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, path)
    # Small blocks and a small step budget, so block tables and chunked prefill are exercised.
    mesh = build_local(path, "float32", EngineConfig(block_size=4, max_num_batched_tokens=24, max_num_seqs=8), progress=False)
    return hf, mesh


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def test_prefill_logits_match(pair):
    hf, mesh = pair
    assert_prefill_logits_match(hf, mesh.engine, _prompts(mesh.cfg.vocab_size))


@pytest.mark.slow
def test_batched_greedy_tokens_match(pair):
    hf, mesh = pair
    assert_greedy_tokens_match(hf, mesh.engine, _prompts(mesh.cfg.vocab_size), NEW_TOKENS)


def test_sampled_token_logprobs_match_transformers_log_softmax(pair):
    # Greedy and sampled (at a temperature: the logprobs stay raw) prompts batched together; each token's
    # logprob and top alternatives against transformers' log_softmax of its logits at that position.
    hf, mesh = pair
    prompts = _prompts(mesh.cfg.vocab_size)
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=4),
              SamplingParams(max_tokens=8, temperature=1.7, seed=3, ignore_eos=True, logprobs=4),
              SamplingParams(max_tokens=8, temperature=0.6, top_p=0.9, seed=4, ignore_eos=True, logprobs=0)]
    for prompt, p, out in zip(prompts, params, mesh.engine.generate(prompts, params)):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1].float()
        ref = torch.log_softmax(logits, dim=-1)
        assert [lp.token_id for lp in out.logprobs] == out.token_ids
        got = torch.tensor([lp.logprob for lp in out.logprobs])
        torch.testing.assert_close(got, ref[torch.arange(len(out.token_ids)), out.token_ids], rtol=0, atol=1e-4)
        for i, lp in enumerate(out.logprobs):
            values, ids = torch.topk(ref[i], p.logprobs)
            assert [t for t, _ in lp.top] == ids.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), values, rtol=0, atol=1e-4)
