"""The torch baselines kernels/bench.py times beside each Triton op: the same math in torch's own ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mla_torch(q_c, q_pe, kv_cache, block_tables, context_lens, block_size, softmax_scale, max_len):
    """Gather the context rows, bmm in the cache dtype, fp32 softmax (eager attention over the latent)."""
    C = q_c.shape[-1]
    pos = torch.arange(max_len, device=kv_cache.device)
    slots = block_tables.long()[:, pos // block_size] * block_size + pos % block_size  # [B, L]
    ctx = kv_cache[slots].to(q_c.dtype)  # [B, L, C + R]
    scores = torch.bmm(torch.cat([q_c, q_pe], dim=-1), ctx.mT).float() * softmax_scale  # [B, H, L]
    scores.masked_fill_((pos[None, :] >= context_lens[:, None])[:, None, :], float("-inf"))
    return torch.bmm(torch.softmax(scores, dim=-1).to(q_c.dtype), ctx[..., :C])  # [B, H, C]


def sparse_mla_torch(q_c, q_pe, kv_cache, block_tables, context_lens, indices, block_size, softmax_scale):
    """Gather the selected rows (torch.gather on the block table), bmm in the cache dtype, fp32 softmax."""
    C, pos = q_c.shape[-1], indices.long()
    valid = (pos >= 0) & (pos < context_lens[:, None])
    pos = pos.clamp(min=0)
    slots = block_tables.long().gather(1, pos // block_size) * block_size + pos % block_size  # [B, K]
    ctx = kv_cache[slots].to(q_c.dtype)  # [B, K, C + R]
    scores = torch.bmm(torch.cat([q_c, q_pe], dim=-1), ctx.mT).float() * softmax_scale  # [B, H, K]
    scores.masked_fill_(~valid[:, None, :], float("-inf"))
    return torch.bmm(torch.softmax(scores, dim=-1).to(q_c.dtype), ctx[..., :C])  # [B, H, C]


def grouped_mm():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def moe_torch(x, w13, w2, topk_idx, topk_weights):
    """Sort the assignments by expert, then two grouped GEMMs (torch's grouped_mm) and a weighted sum."""
    gmm, (T, K), inter = grouped_mm(), topk_idx.shape, w2.shape[-1]
    flat = topk_idx.reshape(-1)
    order = flat.argsort(stable=True)
    tok = order // K
    offs = torch.bincount(flat, minlength=w13.shape[0]).cumsum(0).to(torch.int32)
    gate_up = gmm(x[tok], w13.mT, offs=offs)  # [A, 2I]
    h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    y = gmm(h, w2.mT, offs=offs).float() * topk_weights.reshape(-1)[order, None].float()  # [A, D]
    return torch.zeros(T, x.shape[1], device=x.device).index_add_(0, tok, y).to(x.dtype)
