"""Sparse absorbed MLA decode (DeepSeek-V3.2's DSA): each query attends only to its top-k cache rows.

One query per sequence, as in :mod:`kernels.mla_decode`, but the context is not every position below
context_lens[b]: it is the K positions the lightning indexer chose for that query (``indices[b]``).
Symbols: B sequences, H heads, C kv_lora_rank, R qk_rope_head_dim, K top-k positions per query.

    pos           = indices[b, k]                      (a context position; -1 or >= context_lens[b]: skipped)
    slot(b, pos)  = block_tables[b, pos // block_size] * block_size + pos % block_size
    kv_cache row  = [c_kv (C) | k_pe (R)]              (V3.2: a column slice of a wider row, see below)
    score[b,h,k]  = (q_c[b,h] . c_kv[slot] + q_pe[b,h] . k_pe[slot]) * softmax_scale
    o_c[b,h]      = sum_k softmax(score)[b,h,k] * c_kv[slot]            # [B, H, C]

V3.2's paged cache row is [c_kv | k_pe | indexer key]: the model passes the view ``cache[:, :C + R]``,
whose row stride is C + R + Di; both paths read rows through kv_cache.stride(0) and never the key.

The kernel is mla_decode's split-KV scheme over the K selected positions instead of the whole context:
a grid of (B, cdiv(H, 16), S) programs, each walking its chunk of ``indices[b]`` BLOCK_N at a time with
an online softmax (exp2), writing fp32 partials that mla_decode's merge kernel (the same custom op,
``moemesh::mla_decode_merge``) combines with the log-sum-exp trick. A chunk may hold only skipped
positions (a short context whose top-k is padded by the indexer), so the running max can stay -inf:
the exponentials are taken against a finite stand-in and such a chunk weighs 0 in the merge; a query
with no valid position gets zeros. The launch is the custom op ``moemesh::sparse_mla_decode_split``
(fake impl for FakeTensorMode, see kernels/library.py); no host sync on either path.
"""

from __future__ import annotations

from typing import Callable

import torch

from .choose import use_triton
from .library import expect, expect_one_device, op_name
from .mla_decode import (
    _BLOCK_H,
    _BLOCK_N,
    _FLOAT_DTYPES,
    _INDEX_DTYPES,
    _LOG2E,
    _check_inputs,
    _pick_num_splits,
    mla_decode_merge_launch,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs only torch
    triton = None

HAS_TRITON = triton is not None

SparseMlaDecodeFn = Callable[..., torch.Tensor]


if HAS_TRITON:

    @triton.jit
    def sparse_mla_decode_kernel(
        q_c_ptr,  # [B, H, C]
        q_pe_ptr,  # [B, H, R]
        kv_ptr,  # [slots, >= C + R], rows stride_kv apart
        block_tables_ptr,  # [B, max_blocks]
        context_lens_ptr,  # [B]
        indices_ptr,  # [B, K] context positions
        part_m_ptr,  # [B, H, S] fp32, running max of log2-scaled scores
        part_l_ptr,  # [B, H, S] fp32, sum of exp2(score - max)
        part_acc_ptr,  # [B, H, S, C] fp32, unnormalised weighted sum of c_kv
        scale_log2,  # softmax_scale * log2(e)
        stride_qc_b,
        stride_qc_h,
        stride_qp_b,
        stride_qp_h,
        stride_kv,
        stride_bt,
        stride_ib,
        H,
        C,
        R,
        K,
        block_size,
        max_blocks,
        num_splits,
        BLOCK_H: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr,  # compute in fp32 (the CPU interpreter mishandles bf16 arithmetic)
    ):
        b = tl.program_id(0)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        split = tl.program_id(2)
        h_mask = heads < H
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_R)
        c_mask = offs_c < C
        r_mask = offs_r < R

        # A position is attended only below the context and the table: never read past either.
        ctx_len = tl.minimum(tl.load(context_lens_ptr + b).to(tl.int32), max_blocks * block_size)
        chunk = tl.cdiv(tl.cdiv(K, num_splits), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, K)

        q_c = tl.load(
            q_c_ptr + b * stride_qc_b + heads[:, None] * stride_qc_h + offs_c[None, :],
            mask=h_mask[:, None] & c_mask[None, :],
            other=0.0,
        )  # [BLOCK_H, BLOCK_C]
        q_pe = tl.load(
            q_pe_ptr + b * stride_qp_b + heads[:, None] * stride_qp_h + offs_r[None, :],
            mask=h_mask[:, None] & r_mask[None, :],
            other=0.0,
        )  # [BLOCK_H, BLOCK_R]
        if UPCAST:
            q_c = q_c.to(tl.float32)
            q_pe = q_pe.to(tl.float32)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
        table = block_tables_ptr + b * stride_bt
        picks = indices_ptr + b.to(tl.int64) * stride_ib
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            pos = tl.load(picks + offs_n, mask=offs_n < end, other=-1).to(tl.int32)  # [BLOCK_N]
            valid = (offs_n < end) & (pos >= 0) & (pos < ctx_len)
            block = tl.load(table + pos // block_size, mask=valid, other=0).to(tl.int64)
            rows = kv_ptr + (block * block_size + pos % block_size) * stride_kv  # [BLOCK_N]
            c_kv = tl.load(rows[:, None] + offs_c[None, :], mask=valid[:, None] & c_mask[None, :], other=0.0)
            k_pe = tl.load(rows[:, None] + C + offs_r[None, :], mask=valid[:, None] & r_mask[None, :], other=0.0)
            c_kv = c_kv.to(q_c.dtype)  # [BLOCK_N, BLOCK_C]
            k_pe = k_pe.to(q_c.dtype)  # [BLOCK_N, BLOCK_R]

            scores = tl.dot(q_c, tl.trans(c_kv), input_precision="ieee")
            scores += tl.dot(q_pe, tl.trans(k_pe), input_precision="ieee")  # [BLOCK_H, BLOCK_N]
            scores = tl.where(valid[None, :], scores * scale_log2, float("-inf"))

            # Unlike dense decode a step may hold no valid position: keep the exponents finite.
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(scores - m_safe[:, None])  # [BLOCK_H, BLOCK_N], 0 where skipped
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv, input_precision="ieee")
            m_i = m_new

        part = (b * H + heads) * num_splits + split  # [BLOCK_H]
        tl.store(part_m_ptr + part, m_i, mask=h_mask)
        tl.store(part_l_ptr + part, l_i, mask=h_mask)
        tl.store(
            part_acc_ptr + part.to(tl.int64)[:, None] * C + offs_c[None, :],
            acc,
            mask=h_mask[:, None] & c_mask[None, :],
        )


def _check_indices(indices, batch: int) -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"sparse_mla_decode: indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dim() != 2 or indices.shape[0] != batch:
        raise ValueError(f"sparse_mla_decode: indices must be [B, topk] with B = {batch}, got {tuple(indices.shape)}")
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"sparse_mla_decode: indices must be int32 or int64, got {indices.dtype}")


def _check_all(q_c, q_pe, kv_cache, block_tables, context_lens, indices, block_size, softmax_scale) -> None:
    _check_inputs(q_c, q_pe, kv_cache, block_tables, context_lens, block_size, softmax_scale)
    _check_indices(indices, q_c.shape[0])
    if indices.device != q_c.device:
        raise ValueError(f"sparse_mla_decode: indices must be on {q_c.device}, got {indices.device}")


@torch.library.custom_op(op_name("sparse_mla_decode_split"), mutates_args=())
def sparse_mla_decode_split_launch(
    q_c: torch.Tensor,  # [B, H, C], stride 1 along C
    q_pe: torch.Tensor,  # [B, H, R], stride 1 along R
    kv_cache: torch.Tensor,  # [slots, C + R], stride 1 along C + R (any row stride)
    block_tables: torch.Tensor,  # [B, max_blocks], stride 1 along max_blocks
    context_lens: torch.Tensor,  # [B], contiguous
    indices: torch.Tensor,  # [B, K], stride 1 along K
    block_size: int,
    scale_log2: float,  # softmax_scale * log2(e)
    num_splits: int,
    block_n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The split kernel over the selected positions: per (sequence, head, split) fp32 partials."""
    B, H, C = q_c.shape
    R, K = q_pe.shape[2], indices.shape[1]
    part_m = torch.empty(B, H, num_splits, dtype=torch.float32, device=q_c.device)  # [B, H, S]
    part_l = torch.empty_like(part_m)  # [B, H, S]
    part_acc = torch.empty(B, H, num_splits, C, dtype=torch.float32, device=q_c.device)  # [B, H, S, C]
    on_cuda = q_c.device.type == "cuda"
    upcast = not on_cuda and torch.bfloat16 in (q_c.dtype, kv_cache.dtype)
    launch = {"num_warps": 4, "num_stages": 2} if on_cuda else {}
    sparse_mla_decode_kernel[(B, triton.cdiv(H, _BLOCK_H), num_splits)](
        q_c, q_pe, kv_cache, block_tables, context_lens, indices, part_m, part_l, part_acc,
        scale_log2,
        q_c.stride(0), q_c.stride(1), q_pe.stride(0), q_pe.stride(1), kv_cache.stride(0), block_tables.stride(0),
        indices.stride(0),
        H, C, R, K, block_size, block_tables.shape[1], num_splits,
        BLOCK_H=_BLOCK_H,
        BLOCK_C=max(16, triton.next_power_of_2(C)),
        BLOCK_R=max(16, triton.next_power_of_2(R)),
        BLOCK_N=block_n,
        UPCAST=upcast,
        **launch,
    )  # fmt: skip
    return part_m, part_l, part_acc


@sparse_mla_decode_split_launch.register_fake
def _(q_c, q_pe, kv_cache, block_tables, context_lens, indices, block_size, scale_log2, num_splits, block_n):
    op = "sparse_mla_decode_split"
    expect_one_device(op, q_c=q_c, q_pe=q_pe, kv_cache=kv_cache, block_tables=block_tables,
                      context_lens=context_lens, indices=indices)
    expect(q_c.dim() == 3 and q_pe.dim() == 3 and q_c.shape[:2] == q_pe.shape[:2], op, "q_c [B, H, C], q_pe [B, H, R]")
    B, H, C = q_c.shape
    expect(kv_cache.dim() == 2 and kv_cache.shape[1] == C + q_pe.shape[2], op, "kv_cache must be [slots, C + R]")
    expect(block_tables.dim() == 2 and block_tables.shape[0] == B, op, "block_tables must be [B, max_blocks]")
    expect(tuple(context_lens.shape) == (B,), op, "context_lens must be [B]")
    expect(indices.dim() == 2 and indices.shape[0] == B, op, "indices must be [B, topk]")
    expect(q_c.dtype in _FLOAT_DTYPES and q_pe.dtype == q_c.dtype, op, "q_c and q_pe: one float dtype")
    expect(all(t.dtype in _INDEX_DTYPES for t in (block_tables, context_lens, indices)), op, "int32/int64 indices")
    expect(block_size >= 1 and num_splits >= 1 and block_n >= 16, op, "block_size, num_splits >= 1, block_n >= 16")
    part_m = q_c.new_empty(B, H, num_splits, dtype=torch.float32)
    return part_m, torch.empty_like(part_m), q_c.new_empty(B, H, num_splits, C, dtype=torch.float32)


def sparse_mla_decode(
    q_c: torch.Tensor,  # [B, H, C]
    q_pe: torch.Tensor,  # [B, H, R]
    kv_cache: torch.Tensor,  # [slots, C + R], any row stride
    block_tables: torch.Tensor,  # [B, max_blocks] int32/int64
    context_lens: torch.Tensor,  # [B] int32/int64
    indices: torch.Tensor,  # [B, K] int32/int64 context positions; -1 / >= context_lens[b] skipped
    block_size: int,
    softmax_scale: float,
    num_splits: int | None = None,
    *,
    block_n: int | None = None,
) -> torch.Tensor:
    """Triton split-KV absorbed MLA decode over each query's selected positions; o_c [B, H, C] in q_c's dtype.

    No host sync: the checks read shapes only. num_splits (None: picked from the device, the batch and
    K) splits each query's K positions across programs; block_n (a power of two >= 16) is the positions
    per loop step.
    """
    if not HAS_TRITON:
        raise RuntimeError(
            "sparse_mla_decode: triton is not installed; use sparse_mla_decode_ref or select_sparse_mla_decode(device)"
        )
    _check_all(q_c, q_pe, kv_cache, block_tables, context_lens, indices, block_size, softmax_scale)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"sparse_mla_decode: num_splits must be None or a positive int, got {num_splits!r}")
    block_n = _BLOCK_N if block_n is None else block_n
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"sparse_mla_decode: block_n must be a power of two >= 16, got {block_n}")
    if kv_cache.stride(1) != 1:
        raise ValueError("sparse_mla_decode: kv_cache rows must be contiguous (stride 1 along C + R)")
    B, H, C = q_c.shape
    out = torch.empty(B, H, C, dtype=q_c.dtype, device=q_c.device)  # [B, H, C]
    if B == 0 or H == 0:
        return out
    q_c = q_c if q_c.stride(2) == 1 else q_c.contiguous()
    q_pe = q_pe if q_pe.stride(2) == 1 else q_pe.contiguous()
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    indices = indices if indices.stride(1) == 1 else indices.contiguous()
    if num_splits is None:
        num_splits = _pick_num_splits(B, -(-H // _BLOCK_H), indices.shape[1], block_n, q_c.device)
    parts = sparse_mla_decode_split_launch(
        q_c, q_pe, kv_cache, block_tables, context_lens.contiguous(), indices, block_size,
        float(softmax_scale) * _LOG2E, num_splits, block_n,
    )  # ([B, H, S], [B, H, S], [B, H, S, C])
    mla_decode_merge_launch(*parts, out)
    return out


def sparse_mla_decode_ref(
    q_c: torch.Tensor,  # [B, H, C]
    q_pe: torch.Tensor,  # [B, H, R]
    kv_cache: torch.Tensor,  # [slots, C + R], any row stride
    block_tables: torch.Tensor,  # [B, max_blocks]
    context_lens: torch.Tensor,  # [B]
    indices: torch.Tensor,  # [B, K] context positions; -1 / >= context_lens[b] skipped
    block_size: int,
    softmax_scale: float,
    num_splits: int | None = None,  # accepted for signature parity; the reference never splits
    **_: object,
) -> torch.Tensor:
    """Plain torch: gather the K selected rows, masked softmax in fp32; o_c [B, H, C] in q_c's dtype.

    The cache is read in q_c's dtype (as the model does), then everything runs in fp32. Nothing is read
    on the host (the gather is K wide, a shape), so it also runs sync-free on a GPU.
    """
    _check_all(q_c, q_pe, kv_cache, block_tables, context_lens, indices, block_size, softmax_scale)
    B, H, C = q_c.shape
    K = indices.shape[1]
    capacity = block_tables.shape[1] * block_size
    pos = indices.long()  # [B, K]
    limit = context_lens.long().clamp(max=capacity).unsqueeze(1)  # [B, 1]
    valid = (pos >= 0) & (pos < limit)  # [B, K]
    pos = torch.where(valid, pos, 0)
    # Methods, not t[...] or ~t: those fail on fake CUDA tensors on a CPU-only torch build (tests/fake_cuda.py).
    slots = block_tables.long().gather(1, pos // block_size) * block_size + pos % block_size
    slots = torch.where(valid, slots, 0)  # [B, K]
    ctx = kv_cache.index_select(0, slots.reshape(-1)).view(B, K, -1).to(q_c.dtype).float()  # [B, K, C + R]
    c_kv, k_pe = ctx.narrow(2, 0, C), ctx.narrow(2, C, ctx.shape[2] - C)
    scores = torch.einsum("bhc,bkc->bhk", q_c.float(), c_kv)
    scores = scores + torch.einsum("bhr,bkr->bhk", q_pe.float(), k_pe)  # [B, H, K]
    invalid = valid.unsqueeze(1).logical_not()  # [B, 1, K]
    scores = (scores * softmax_scale).masked_fill(invalid, float("-inf"))
    p = torch.softmax(scores, dim=-1).masked_fill(invalid, 0.0)  # no valid position: zeros
    return torch.einsum("bhk,bkc->bhc", p, c_kv).to(q_c.dtype)  # [B, H, C]


def select_sparse_mla_decode(device: torch.device | str, force_triton: bool = False) -> SparseMlaDecodeFn:
    """Choose once, at construction (the rule: :func:`kernels.choose.use_triton`)."""
    return sparse_mla_decode if use_triton(device, force_triton, "select_sparse_mla_decode") else sparse_mla_decode_ref
