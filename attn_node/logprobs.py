"""Logprobs of a step's sampled tokens and their top alternatives, packed with the ids for the step's one read.

What is computed (vLLM's default, "raw" logprobs): ``log_softmax`` of the fp32 logits the sampler got, before
temperature, top-k and top-p. So a token's logprob says how likely the *model* found it, the same at any
temperature; at temperature 0 the sampled token is the top-1 alternative (up to ties).

Only the rows whose request asked (``SamplingParams.logprobs`` not None) pay: they are gathered out of the
batch (views, one copy), and a step where no row asked computes nothing here. The device part
(:func:`logprob_block`) builds everything on the logits' device; :func:`pack` puts the sampled ids and that
block into one float64 tensor (ids below 2**53 are exact in float64), so the engine still reads the step back
with a single ``.tolist()``; :func:`unpack` turns the values into typed records on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moemesh.sampling import SamplingParams


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's logprob and the step's most likely tokens, most likely first (``k`` of them)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob)


def asking_rows(params: list[SamplingParams]) -> list[int]:
    """Rows of the step whose request asked for logprobs."""
    return [i for i, p in enumerate(params) if p.logprobs is not None]


def top_width(params: list[SamplingParams], vocab_size: int) -> int:
    """Alternatives computed per asking row: the largest k asked (each row keeps its own k when unpacked)."""
    return min(vocab_size, max((p.logprobs for p in params if p.logprobs is not None), default=0))


def logprob_block(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor | None:
    """[n_asking, 1 + 2K] float64 on the logits' device: each asking row's sampled logprob, its top-K logprobs,
    then their token ids; None when no row asked. ``logits`` [B, V] fp32 as the sampler got them, ``tokens`` [B]."""
    rows = asking_rows(params)
    if not rows:
        return None
    if len(rows) == logits.shape[0]:
        picked, picked_tokens = logits, tokens
    else:  # row views stacked in one copy; an index tensor would be a second upload
        picked = torch.stack([logits[i] for i in rows])
        picked_tokens = torch.stack([tokens[i] for i in rows])
    logp = torch.log_softmax(picked.float(), dim=-1)  # [n, V]
    sampled = logp.gather(1, picked_tokens.view(-1, 1))  # [n, 1]
    k = top_width(params, logits.shape[-1])
    values, ids = torch.topk(logp, k, dim=-1)  # [n, K], most likely first
    return torch.cat([sampled, values, ids.to(logp.dtype)], dim=1).to(torch.float64)


def pack(tokens: torch.Tensor, block: torch.Tensor | None) -> torch.Tensor:
    """One tensor to read back: the ids alone when no row asked, else [B] ids then the block, as float64."""
    if block is None:
        return tokens
    return torch.cat([tokens.to(torch.float64), block.flatten()])


def unpack(values: list, params: list[SamplingParams], vocab_size: int) -> tuple[list[int], list[TokenLogprobs | None]]:
    """The host side of :func:`pack`: (the sampled ids, per row its TokenLogprobs or None when it did not ask)."""
    n = len(params)
    tokens = [int(v) for v in values[:n]]
    out: list[TokenLogprobs | None] = [None] * n
    k = top_width(params, vocab_size)
    width = 1 + 2 * k
    for j, i in enumerate(asking_rows(params)):
        row = values[n + j * width : n + (j + 1) * width]
        mine = params[i].logprobs
        top = tuple((int(row[1 + k + a]), row[1 + a]) for a in range(min(mine, k)))
        out[i] = TokenLogprobs(tokens[i], row[0], top)
    return tokens, out
