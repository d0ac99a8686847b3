"""Token sampling: greedy, temperature, top-k, top-p, with a per-request seeded generator; logprobs on request."""

from __future__ import annotations

import torch

from moemesh.sampling import SamplingParams

from .logprobs import TokenLogprobs, logprob_block, pack, unpack


def sample_tokens(
    logits: torch.Tensor,  # [B, vocab] fp32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """One token per row, [B] int64 on the logits' device, without reading anything back to the host.

    Greedy rows take the argmax; the others draw from the filtered distribution with their own generator
    (on the same device as the logits). The caller reads the ids once per step (:func:`sample`).
    """
    tokens = logits.argmax(dim=-1)  # [B]
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = _filtered_probs(logits[i] / p.temperature, p.top_k, p.top_p)
        tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return tokens


def sample(
    logits: torch.Tensor,  # [B, vocab] fp32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """:func:`sample_tokens`, read back: the step's one host sync."""
    return sample_tokens(logits, params, generators).tolist()


def sample_step(
    logits: torch.Tensor,  # [B, vocab] fp32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """:func:`sample`, with each asking row's logprobs (attn_node/logprobs.py) read back in the same transfer:
    (the sampled ids, per row its TokenLogprobs or None). Still the step's one host sync."""
    tokens = sample_tokens(logits, params, generators)
    block = logprob_block(logits, tokens, params)  # on the logits the sampler got: raw logprobs
    return unpack(pack(tokens, block).tolist(), params, logits.shape[-1])


def skip_draws(generator: torch.Generator, vocab_size: int, n: int) -> None:
    """Advance ``generator`` past ``n`` draws of :func:`sample` over a ``vocab_size``-entry distribution.

    A resumed request (tokens sampled on a node that died) continues the random stream where that node
    left it. This relies on a draw's use of the generator depending on the row's shape only, never on
    its values: ``torch.multinomial`` of one sample takes one exponential per vocabulary entry (its
    exponential-race fast path), so n draws over a flat distribution advance the state exactly as the
    n real draws did. tests/unit/test_sampler.py checks it, so a torch that changes this fails there.
    """
    if n <= 0:
        return
    flat = torch.full((vocab_size,), 1.0 / vocab_size, device=generator.device)
    for _ in range(n):
        torch.multinomial(flat, 1, generator=generator)


def _filtered_probs(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)  # not sorted_probs[drop]: a mask's size is a host read
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs
