"""Absorbed MLA decode over the paged latent cache: split-KV Triton kernel, plain-torch reference, selector.

One query per sequence. The query has already absorbed W_UK (q_c = q_nope @ W_UK per head); the output
o_c is still latent (W_UV is applied by the caller).

Symbols: B sequences, H heads, C kv_lora_rank (latent), R qk_rope_head_dim, S splits of the context,
N context positions per loop step.

    kv_cache row  = [c_kv (C) | k_pe (R)]
    slot(b, pos)  = block_tables[b, pos // block_size] * block_size + pos % block_size
    score[b,h,s]  = (q_c[b,h] . c_kv[s] + q_pe[b,h] . k_pe[s]) * softmax_scale,   s < context_lens[b]
    o_c[b,h]      = sum_s softmax(score)[b,h,s] * c_kv[s]                          # [B, H, C]

The kernel (FlashMLA-style split-KV) runs a grid of (B, cdiv(H, BLOCK_H), S): each program walks the
block table over its chunk of one sequence's context with an online softmax and writes a partial
(max, sum of exponentials, unnormalised weighted sum of c_kv). A second kernel merges the S partials
of each (sequence, head) with the log-sum-exp trick. Accumulation is fp32; the output has q_c's dtype.
A sequence with context length 0 gets zeros.

Each kernel launch is a torch custom op (``moemesh::mla_decode_split``, ``moemesh::mla_decode_merge``,
see kernels/library.py) with a fake impl, so the wrapper runs under FakeTensorMode. No host sync: the
Triton wrapper checks shapes only. The reference reads context_lens on the host unless the caller passes
``max_context_len`` (the longest context, which the runner knows on the host as its S).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .choose import use_triton
from .library import expect, expect_one_device, op_name

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs only torch
    triton = None

HAS_TRITON = triton is not None
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_LOG2E = 1.4426950408889634
_BLOCK_H = 16  # heads per program; tl.dot needs M >= 16
_BLOCK_N = 32  # context positions per loop step
_MAX_SPLITS = 32

MlaDecodeFn = Callable[..., torch.Tensor]


if HAS_TRITON:

    @triton.jit
    def mla_decode_kernel(
        q_c_ptr,  # [B, H, C]
        q_pe_ptr,  # [B, H, R]
        kv_ptr,  # [slots, C + R]
        block_tables_ptr,  # [B, max_blocks]
        context_lens_ptr,  # [B]
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
        H,
        C,
        R,
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

        # Never read past the block table, whatever context_lens says.
        ctx_len = tl.minimum(tl.load(context_lens_ptr + b).to(tl.int32), max_blocks * block_size)
        chunk = tl.cdiv(tl.cdiv(ctx_len, num_splits), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, ctx_len)

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
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            n_mask = pos < end
            block = tl.load(table + pos // block_size, mask=n_mask, other=0).to(tl.int64)
            rows = kv_ptr + (block * block_size + pos % block_size) * stride_kv  # [BLOCK_N]
            c_kv = tl.load(rows[:, None] + offs_c[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0.0)
            k_pe = tl.load(rows[:, None] + C + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            c_kv = c_kv.to(q_c.dtype)  # [BLOCK_N, BLOCK_C]
            k_pe = k_pe.to(q_c.dtype)  # [BLOCK_N, BLOCK_R]

            scores = tl.dot(q_c, tl.trans(c_kv), input_precision="ieee")
            scores += tl.dot(q_pe, tl.trans(k_pe), input_precision="ieee")  # [BLOCK_H, BLOCK_N]
            scores = tl.where(n_mask[None, :], scores * scale_log2, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: every step has a valid position
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])  # [BLOCK_H, BLOCK_N]
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

    @triton.jit
    def mla_decode_merge_kernel(
        part_m_ptr,  # [B, H, S]
        part_l_ptr,  # [B, H, S]
        part_acc_ptr,  # [B, H, S, C]
        out_ptr,  # [B, H, C]
        stride_ob,
        stride_oh,
        H,
        C,
        num_splits,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_c = tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        offs_s = tl.arange(0, BLOCK_S)
        base = (b * H + h) * num_splits

        s_mask = offs_s < num_splits
        m_all = tl.load(part_m_ptr + base + offs_s, mask=s_mask, other=float("-inf"))  # [BLOCK_S]
        l_all = tl.load(part_l_ptr + base + offs_s, mask=s_mask, other=0.0)
        m_max = tl.max(m_all, axis=0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # context length 0: every weight is 0
        denom = tl.sum(tl.exp2(m_all - m_max) * l_all, axis=0)  # an empty split (max -inf) weighs 0
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s in range(0, num_splits):
            w = tl.exp2(tl.load(part_m_ptr + base + s) - m_max)
            acc += w * tl.load(part_acc_ptr + (base + s).to(tl.int64) * C + offs_c, mask=c_mask, other=0.0)
        out = acc / tl.where(denom > 0.0, denom, 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_c, out.to(out_ptr.dtype.element_ty), mask=c_mask)


def _check_inputs(q_c, q_pe, kv_cache, block_tables, context_lens, block_size, softmax_scale) -> None:
    """Shapes, dtypes and devices; raises ValueError/TypeError that say what is expected."""
    named = {"q_c": q_c, "q_pe": q_pe, "kv_cache": kv_cache, "block_tables": block_tables, "context_lens": context_lens}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mla_decode: {name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {t.device for t in named.values()}
    if len(devices) != 1:
        raise ValueError(f"mla_decode: all tensors must be on one device, got {sorted(map(str, devices))}")
    if q_c.dim() != 3 or q_pe.dim() != 3 or q_c.shape[:2] != q_pe.shape[:2]:
        raise ValueError(
            f"mla_decode: q_c must be [B, H, C] and q_pe [B, H, R] with the same B, H; "
            f"got {tuple(q_c.shape)} and {tuple(q_pe.shape)}"
        )
    B, _, C = q_c.shape
    R = q_pe.shape[2]
    if kv_cache.dim() != 2 or kv_cache.shape[1] != C + R:
        raise ValueError(f"mla_decode: kv_cache must be [slots, C + R] = [slots, {C + R}], got {tuple(kv_cache.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(
            f"mla_decode: block_tables must be [B, max_blocks] with B = {B}, got {tuple(block_tables.shape)}"
        )
    if context_lens.dim() != 1 or context_lens.shape[0] != B:
        raise ValueError(f"mla_decode: context_lens must be [B] with B = {B}, got {tuple(context_lens.shape)}")
    if q_c.dtype not in _FLOAT_DTYPES or q_pe.dtype != q_c.dtype:
        raise TypeError(
            f"mla_decode: q_c and q_pe must share one dtype of float32/float16/bfloat16, "
            f"got {q_c.dtype} and {q_pe.dtype}"
        )
    if kv_cache.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"mla_decode: kv_cache must be float32/float16/bfloat16, got {kv_cache.dtype}")
    for name in ("block_tables", "context_lens"):
        if named[name].dtype not in _INDEX_DTYPES:
            raise TypeError(f"mla_decode: {name} must be int32 or int64, got {named[name].dtype}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"mla_decode: block_size must be a positive int, got {block_size!r}")
    if not math.isfinite(float(softmax_scale)):
        raise ValueError(f"mla_decode: softmax_scale must be finite, got {softmax_scale!r}")


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a real CUDA device; 1 elsewhere (CPU, or fake CUDA on a CPU-only build)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _pick_num_splits(batch: int, head_blocks: int, max_context: int, block_n: int, device: torch.device) -> int:
    """Enough programs for about two waves over the device, without splits shorter than 2 loop steps."""
    want = -(-2 * _sm_count(device) // max(1, batch * head_blocks))
    useful = max(1, -(-max_context // (2 * block_n)))
    return max(1, min(want, useful, _MAX_SPLITS))


def _check_max_context_len(max_context_len: int | None, capacity: int, op: str) -> None:
    """The caller's host-side bound on context_lens (shape-only: nothing is read off the device)."""
    if max_context_len is None:
        return
    is_int = isinstance(max_context_len, int) and not isinstance(max_context_len, bool)
    if not is_int or not 0 <= max_context_len <= capacity:
        raise ValueError(
            f"{op}: max_context_len must be None or an int in [0, {capacity}] (block table capacity), "
            f"got {max_context_len!r}"
        )


# ---- the custom ops: one per Triton launch (see kernels/library.py) --------


@torch.library.custom_op(op_name("mla_decode_split"), mutates_args=())
def mla_decode_split_launch(
    q_c: torch.Tensor,  # [B, H, C], stride 1 along C
    q_pe: torch.Tensor,  # [B, H, R], stride 1 along R
    kv_cache: torch.Tensor,  # [slots, C + R], stride 1 along C + R
    block_tables: torch.Tensor,  # [B, max_blocks], stride 1 along max_blocks
    context_lens: torch.Tensor,  # [B], contiguous
    block_size: int,
    scale_log2: float,  # softmax_scale * log2(e)
    num_splits: int,
    block_n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The split-KV kernel: per (sequence, head, split) partials (max, sum, acc), all fp32."""
    B, H, C = q_c.shape
    R = q_pe.shape[2]
    part_m = torch.empty(B, H, num_splits, dtype=torch.float32, device=q_c.device)  # [B, H, S]
    part_l = torch.empty_like(part_m)  # [B, H, S]
    part_acc = torch.empty(B, H, num_splits, C, dtype=torch.float32, device=q_c.device)  # [B, H, S, C]
    on_cuda = q_c.device.type == "cuda"
    upcast = not on_cuda and torch.bfloat16 in (q_c.dtype, kv_cache.dtype)
    launch = {"num_warps": 4, "num_stages": 2} if on_cuda else {}
    mla_decode_kernel[(B, triton.cdiv(H, _BLOCK_H), num_splits)](
        q_c, q_pe, kv_cache, block_tables, context_lens, part_m, part_l, part_acc,
        scale_log2,
        q_c.stride(0), q_c.stride(1), q_pe.stride(0), q_pe.stride(1), kv_cache.stride(0), block_tables.stride(0),
        H, C, R, block_size, block_tables.shape[1], num_splits,
        BLOCK_H=_BLOCK_H,
        BLOCK_C=max(16, triton.next_power_of_2(C)),
        BLOCK_R=max(16, triton.next_power_of_2(R)),
        BLOCK_N=block_n,
        UPCAST=upcast,
        **launch,
    )  # fmt: skip
    return part_m, part_l, part_acc


@mla_decode_split_launch.register_fake
def _(q_c, q_pe, kv_cache, block_tables, context_lens, block_size, scale_log2, num_splits, block_n):
    op = "mla_decode_split"
    expect_one_device(op, q_c=q_c, q_pe=q_pe, kv_cache=kv_cache, block_tables=block_tables, context_lens=context_lens)
    expect(q_c.dim() == 3 and q_pe.dim() == 3 and q_c.shape[:2] == q_pe.shape[:2], op, "q_c [B, H, C], q_pe [B, H, R]")
    B, H, C = q_c.shape
    expect(kv_cache.dim() == 2 and kv_cache.shape[1] == C + q_pe.shape[2], op, "kv_cache must be [slots, C + R]")
    expect(block_tables.dim() == 2 and block_tables.shape[0] == B, op, "block_tables must be [B, max_blocks]")
    expect(tuple(context_lens.shape) == (B,), op, "context_lens must be [B]")
    expect(q_c.dtype in _FLOAT_DTYPES and q_pe.dtype == q_c.dtype, op, "q_c and q_pe: one float dtype")
    expect(block_tables.dtype in _INDEX_DTYPES and context_lens.dtype in _INDEX_DTYPES, op, "int32/int64 indices")
    expect(block_size >= 1 and num_splits >= 1 and block_n >= 16, op, "block_size, num_splits >= 1, block_n >= 16")
    part_m = q_c.new_empty(B, H, num_splits, dtype=torch.float32)
    return part_m, torch.empty_like(part_m), q_c.new_empty(B, H, num_splits, C, dtype=torch.float32)


@torch.library.custom_op(op_name("mla_decode_merge"), mutates_args=("out",))
def mla_decode_merge_launch(
    part_m: torch.Tensor,  # [B, H, S] fp32
    part_l: torch.Tensor,  # [B, H, S] fp32
    part_acc: torch.Tensor,  # [B, H, S, C] fp32
    out: torch.Tensor,  # [B, H, C], stride 1 along C; written
) -> None:
    """The merge kernel: log-sum-exp over the S partials of each (sequence, head), into ``out``."""
    B, H, num_splits, C = part_acc.shape
    mla_decode_merge_kernel[(B, H)](
        part_m, part_l, part_acc, out, out.stride(0), out.stride(1), H, C, num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits),
        BLOCK_C=max(16, triton.next_power_of_2(C)),
    )  # fmt: skip


@mla_decode_merge_launch.register_fake
def _(part_m, part_l, part_acc, out):
    op = "mla_decode_merge"
    expect_one_device(op, part_m=part_m, part_l=part_l, part_acc=part_acc, out=out)
    expect(part_acc.dim() == 4 and part_m.shape == part_l.shape == part_acc.shape[:3], op, "partials [B, H, S(, C)]")
    expect(all(t.dtype == torch.float32 for t in (part_m, part_l, part_acc)), op, "partials must be fp32")
    B, H, _, C = part_acc.shape
    expect(tuple(out.shape) == (B, H, C) and out.dtype in _FLOAT_DTYPES, op, "out must be a float [B, H, C]")


# ---- wrappers --------------------------------------------------------------


def mla_decode(
    q_c: torch.Tensor,  # [B, H, C]
    q_pe: torch.Tensor,  # [B, H, R]
    kv_cache: torch.Tensor,  # [slots, C + R]
    block_tables: torch.Tensor,  # [B, max_blocks] int32/int64
    context_lens: torch.Tensor,  # [B] int32/int64
    block_size: int,
    softmax_scale: float,
    num_splits: int | None = None,
    *,
    block_n: int | None = None,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """Triton split-KV absorbed MLA decode; returns o_c [B, H, C] in q_c's dtype (fp32 accumulation).

    No host sync: the checks read shapes only. context_lens[b] must be at most max_blocks * block_size
    (the kernel never reads past the table, whatever context_lens says). max_context_len, the caller's
    host-known bound on context_lens (the runner's S), only sizes the default num_splits; None = the
    table's capacity. num_splits (None: picked from the device and the batch) splits each context across
    programs; block_n (a power of two >= 16) is the positions per loop step.
    """
    if not HAS_TRITON:
        raise RuntimeError("mla_decode: triton is not installed; use mla_decode_ref or select_mla_decode(device)")
    _check_inputs(q_c, q_pe, kv_cache, block_tables, context_lens, block_size, softmax_scale)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"mla_decode: num_splits must be None or a positive int, got {num_splits!r}")
    block_n = _BLOCK_N if block_n is None else block_n
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"mla_decode: block_n must be a power of two >= 16, got {block_n}")
    if kv_cache.stride(1) != 1:
        raise ValueError("mla_decode: kv_cache rows must be contiguous (stride 1 along C + R)")
    capacity = block_tables.shape[1] * block_size
    _check_max_context_len(max_context_len, capacity, "mla_decode")

    B, H, C = q_c.shape
    out = torch.empty(B, H, C, dtype=q_c.dtype, device=q_c.device)  # [B, H, C]
    if B == 0 or H == 0:
        return out
    q_c = q_c if q_c.stride(2) == 1 else q_c.contiguous()
    q_pe = q_pe if q_pe.stride(2) == 1 else q_pe.contiguous()
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    context_lens = context_lens.contiguous()
    if num_splits is None:
        longest = capacity if max_context_len is None else max_context_len
        num_splits = _pick_num_splits(B, -(-H // _BLOCK_H), longest, block_n, q_c.device)
    parts = mla_decode_split_launch(
        q_c, q_pe, kv_cache, block_tables, context_lens, block_size, float(softmax_scale) * _LOG2E, num_splits, block_n
    )  # ([B, H, S], [B, H, S], [B, H, S, C])
    mla_decode_merge_launch(*parts, out)
    return out


def mla_decode_ref(
    q_c: torch.Tensor,  # [B, H, C]
    q_pe: torch.Tensor,  # [B, H, R]
    kv_cache: torch.Tensor,  # [slots, C + R]
    block_tables: torch.Tensor,  # [B, max_blocks]
    context_lens: torch.Tensor,  # [B]
    block_size: int,
    softmax_scale: float,
    num_splits: int | None = None,  # accepted for signature parity; the reference never splits
    *,
    max_context_len: int | None = None,
    **_: object,
) -> torch.Tensor:
    """Plain torch: gather the context rows, softmax in fp32; o_c [B, H, C] in q_c's dtype.

    The cache is read in q_c's dtype (as the model does), then everything runs in fp32.
    max_context_len None: context_lens is read on the host (one sync) to size the gather and checked to
    lie in [0, capacity]. Given (the caller's host-known bound, e.g. the runner's S), nothing is read
    off the device: the gather is max_context_len wide, and positions past it are not attended.
    """
    _check_inputs(q_c, q_pe, kv_cache, block_tables, context_lens, block_size, softmax_scale)
    B, H, C = q_c.shape
    ctx_len = context_lens.long()
    capacity = block_tables.shape[1] * block_size
    _check_max_context_len(max_context_len, capacity, "mla_decode_ref")
    if max_context_len is not None:
        S = max_context_len
    else:
        S = ctx_len.max().item() if B else 0
        if S > capacity or (B and ctx_len.min().item() < 0):
            raise ValueError(f"mla_decode_ref: context_lens must lie in [0, {capacity}] (block table capacity)")
    # Methods, not t[...] or ~t: those fail on fake CUDA tensors on a CPU-only torch build (tests/fake_cuda.py).
    pos = torch.arange(S, device=q_c.device)  # [S]
    valid = pos.unsqueeze(0) < ctx_len.unsqueeze(1)  # [B, S]
    tables = block_tables.long().index_select(1, pos // block_size)  # [B, S]
    slots = torch.where(valid, tables * block_size + pos % block_size, 0)  # [B, S]
    ctx = kv_cache.index_select(0, slots.reshape(-1)).view(B, S, -1).to(q_c.dtype).float()  # [B, S, C + R]
    c_kv, k_pe = ctx.narrow(2, 0, C), ctx.narrow(2, C, ctx.shape[2] - C)
    scores = torch.einsum("bhc,bsc->bhs", q_c.float(), c_kv)
    scores = scores + torch.einsum("bhr,bsr->bhs", q_pe.float(), k_pe)  # [B, H, S]
    invalid = valid.unsqueeze(1).logical_not()  # [B, 1, S]
    scores = (scores * softmax_scale).masked_fill(invalid, float("-inf"))
    p = torch.softmax(scores, dim=-1).masked_fill(invalid, 0.0)  # a 0-length context: zeros
    return torch.einsum("bhs,bsc->bhc", p, c_kv).to(q_c.dtype)  # [B, H, C]


def select_mla_decode(device: torch.device | str, force_triton: bool = False) -> MlaDecodeFn:
    """Choose once, at construction (the rule: :func:`kernels.choose.use_triton`)."""
    return mla_decode if use_triton(device, force_triton, "select_mla_decode") else mla_decode_ref


def mla_decode_op(
    q_c: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    softmax_scale: float,
    num_splits: int | None = None,
    *,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """Per-call dispatch by q_c's device (Triton on CUDA, reference elsewhere); prefer select_mla_decode once."""
    fn = select_mla_decode(q_c.device)
    return fn(q_c, q_pe, kv_cache, block_tables, context_lens, block_size, softmax_scale, num_splits,
              max_context_len=max_context_len)
