"""Fused MoE: the routed-expert SwiGLU of a batch in two grouped Triton GEMMs.

Glossary: T tokens, D hidden size, I moe_intermediate_size, E experts in the
weight stack, K experts per token, A = T*K (token, slot) assignments,
BM/BN/BK the kernel tile sizes.

``fused_moe(x, w13, w2, topk_idx, topk_weights)`` computes, per token t,
``sum_k w[t,k] * w2[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t]))`` with
``e = topk_idx[t,k]`` (``-1`` = skip), ``w13[e] = [gate; up]`` ([2I, D]) and
``w2[e]`` ([D, I]); the same math as :meth:`moemesh.expert_node.shard.ExpertShard.forward`.

How (vLLM/SGLang style):

1. :func:`moe_align_block_size` (torch, no host sync): sort the A assignments
   by expert, pad each expert's run to a multiple of BM, and give every BM-row
   block its expert id. Blocks past the used ones get expert ``-1`` and exit at
   once, so the grid size is a bound known without reading the routing.
2. :func:`fused_moe_gate_up_kernel`: per (row block, column block), gather the
   block's token rows of ``x`` and run gate and up GEMMs against that block's
   expert together; ``silu(gate) * up`` is applied in registers and ``h``
   ([A_pad, I]) is written once.
3. :func:`fused_moe_down_kernel`: ``h @ w2[e]^T`` times the routing weight,
   written to row ``t*K + k`` of a [A, D] buffer; a torch sum over K gives
   [T, D]. No atomics, so results are deterministic.

FP8 (:func:`fused_moe_fp8`): DeepSeek-V3 block-scaled e4m3 weights with one
fp32 ``scale_inv`` per (bn x bk) block. Activations stay in x's dtype
(weight-only FP8). The kernels convert each float8 tile to the dot dtype (exact:
every e4m3 value is an fp16 and a bf16 value) and apply the scales inside the K
loop: when BK divides bk the whole K step shares one scale per output column,
applied to the dot's result; otherwise each weight element is scaled before the
dot. How the float8 tile is read:

* NVIDIA sm_89+ and the CPU interpreter: loaded as ``tl.float8e4nv``. Triton
  3.9's interpreter loads float8 tensors correctly (checked for every finite
  e4m3 code; the two NaN codes read as +-480), so no workaround is needed there.
* older GPUs (sm_80/86, where Triton rejects ``fp8e4nv``) and ROCm: the weights
  are passed as their uint8 bits and decoded in the kernel with integer ops
  (:func:`_e4m3_bits_to_fp16`, exact).

Dtypes: fp32, fp16, bf16. Accumulation is fp32; fp32 dots use IEEE precision
(no TF32). Triton's CPU interpreter computes bf16 dots wrongly, so under
``TRITON_INTERPRET=1`` bf16 tiles are upcast to fp32 inside the kernel.

:func:`select_fused_moe` chooses the Triton op or the torch reference (kernels/fused_moe_ref.py) once; the
entry points' argument checks live in kernels/fused_moe_checks.py.

Each launch is a torch custom op (``moemesh::fused_moe_gate_up`` returning ``h``,
``moemesh::fused_moe_down`` returning the per-assignment rows), with a fake impl (kernels/library.py);
the routing layout and the sum over K are torch glue outside the ops, so FakeTensorMode runs them
too. Host syncs: none, except ``check_ids=True`` (the default at this API boundary), which reads the
id range on the host; the op set the model calls (kernels/ops.py) passes ``check_ids=False``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch

from .choose import use_triton
from .fused_moe_checks import check_routing, check_scales, check_weights, check_x
from .fused_moe_ref import fused_moe_fp8_ref, fused_moe_ref
from .library import expect, expect_one_device, op_name

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references need only torch
    triton = None

HAS_TRITON = triton is not None

__all__ = [
    "fused_moe",
    "fused_moe_ref",
    "fused_moe_fp8",
    "fused_moe_fp8_ref",
    "moe_align_block_size",
    "select_fused_moe",
]

# ---- kernels ---------------------------------------------------------------


if HAS_TRITON:

    @triton.jit
    def _e4m3_bits_to_fp16(b):
        """float8 e4m3fn bit patterns (uint8) -> fp16 values, exactly (NaN codes decode as +-480).

        The 7 magnitude bits placed at fp16's exponent/mantissa boundary give the value / 2**8
        (normal and subnormal codes alike: the exponent biases differ by 8).
        """
        b = b.to(tl.uint16)
        bits = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
        return bits.to(tl.float16, bitcast=True) * 256.0

    @triton.jit
    def fused_moe_gate_up_kernel(
        x_ptr,  # [T, D]
        w_ptr,  # [E, 2I, D] (gate rows 0..I-1, up rows I..2I-1)
        s_ptr,  # [E, ceil(2I/bn), ceil(D/bk)] fp32 scale_inv (FP8 only; any pointer otherwise)
        h_ptr,  # [A_pad, I] out
        sorted_ids_ptr,  # [A_pad] int32 flat assignment t*K+k, >= n_assign for padding
        block_expert_ptr,  # [A_pad / BM] int32, -1 = unused block
        n_assign,
        top_k,
        D,
        I,
        stride_xt,
        stride_xd,
        stride_we,
        stride_wn,
        stride_wd,
        stride_se,
        stride_sn,
        stride_sk,
        stride_hm,
        scale_bn,
        scale_bk,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        FP8: tl.constexpr,
        SCALE_PER_COLUMN: tl.constexpr,
        DECODE_E4M3: tl.constexpr,  # FP8 weights arrive as uint8 bits (GPUs without native e4m3)
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        if expert < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        sid = tl.load(sorted_ids_ptr + offs_m)
        row_ok = sid < n_assign
        tok = (sid // top_k).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < I
        offs_k = tl.arange(0, BLOCK_K)

        x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xd  # [BM, BK]
        g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wd  # [BK, BN]
        u_ptrs = g_ptrs + I * stride_wn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k_ok = offs_k < D - k0
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
            w_mask = k_ok[:, None] & n_ok[None, :]
            wg = tl.load(g_ptrs, mask=w_mask, other=0.0)
            wu = tl.load(u_ptrs, mask=w_mask, other=0.0)
            if DECODE_E4M3:
                wg = _e4m3_bits_to_fp16(wg)
                wu = _e4m3_bits_to_fp16(wu)
            if FP8:
                s_base = s_ptr + expert * stride_se
                if SCALE_PER_COLUMN:  # the whole K step lies in one scale block: scale the dot's columns
                    s_k = (k0 // scale_bk) * stride_sk
                    sg = tl.load(s_base + (offs_n // scale_bn) * stride_sn + s_k, mask=n_ok, other=0.0)
                    su = tl.load(s_base + ((offs_n + I) // scale_bn) * stride_sn + s_k, mask=n_ok, other=0.0)
                    acc_g += tl.dot(a, wg.to(DOT_DTYPE), input_precision="ieee") * sg[None, :]
                    acc_u += tl.dot(a, wu.to(DOT_DTYPE), input_precision="ieee") * su[None, :]
                else:  # scale blocks split the K step: dequantize element by element
                    s_k = ((k0 + offs_k) // scale_bk)[:, None] * stride_sk
                    sg = tl.load(s_base + (offs_n // scale_bn)[None, :] * stride_sn + s_k, mask=w_mask, other=0.0)
                    su = tl.load(s_base + ((offs_n + I) // scale_bn)[None, :] * stride_sn + s_k, mask=w_mask, other=0.0)
                    acc_g += tl.dot(a, (wg.to(tl.float32) * sg).to(DOT_DTYPE), input_precision="ieee")
                    acc_u += tl.dot(a, (wu.to(tl.float32) * su).to(DOT_DTYPE), input_precision="ieee")
            else:
                acc_g += tl.dot(a, wg.to(DOT_DTYPE), input_precision="ieee")
                acc_u += tl.dot(a, wu.to(DOT_DTYPE), input_precision="ieee")
            x_ptrs += BLOCK_K * stride_xd
            g_ptrs += BLOCK_K * stride_wd
            u_ptrs += BLOCK_K * stride_wd

        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up, [BM, BN] fp32
        h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=n_ok[None, :])


    @triton.jit
    def fused_moe_down_kernel(
        h_ptr,  # [A_pad, I]
        w_ptr,  # [E, D, I]
        s_ptr,  # [E, ceil(D/bn), ceil(I/bk)] fp32 scale_inv (FP8 only)
        out_ptr,  # [A, D] out, row t*K+k
        rw_ptr,  # [A] fp32 routing weights
        sorted_ids_ptr,
        block_expert_ptr,
        n_assign,
        D,
        I,
        stride_hm,
        stride_we,
        stride_wn,
        stride_wk,
        stride_se,
        stride_sn,
        stride_sk,
        stride_om,
        scale_bn,
        scale_bk,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        FP8: tl.constexpr,
        SCALE_PER_COLUMN: tl.constexpr,
        DECODE_E4M3: tl.constexpr,  # FP8 weights arrive as uint8 bits (GPUs without native e4m3)
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        if expert < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        sid = tl.load(sorted_ids_ptr + offs_m)
        row_ok = sid < n_assign
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < D
        offs_k = tl.arange(0, BLOCK_K)

        a_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_k[None, :]  # [BM, BK]
        w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            k_ok = offs_k < I - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
            w_mask = k_ok[:, None] & n_ok[None, :]
            w = tl.load(w_ptrs, mask=w_mask, other=0.0)
            if DECODE_E4M3:
                w = _e4m3_bits_to_fp16(w)
            if FP8:
                s_base = s_ptr + expert * stride_se
                if SCALE_PER_COLUMN:
                    s_ptrs = s_base + (offs_n // scale_bn) * stride_sn + (k0 // scale_bk) * stride_sk
                    s = tl.load(s_ptrs, mask=n_ok, other=0.0)
                    acc += tl.dot(a, w.to(DOT_DTYPE), input_precision="ieee") * s[None, :]
                else:
                    s_k = ((k0 + offs_k) // scale_bk)[:, None] * stride_sk
                    s = tl.load(s_base + (offs_n // scale_bn)[None, :] * stride_sn + s_k, mask=w_mask, other=0.0)
                    acc += tl.dot(a, (w.to(tl.float32) * s).to(DOT_DTYPE), input_precision="ieee")
            else:
                acc += tl.dot(a, w.to(DOT_DTYPE), input_precision="ieee")
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk

        rw = tl.load(rw_ptr + sid, mask=row_ok, other=0.0)
        acc = acc * rw[:, None]
        o_ptrs = out_ptr + sid[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


# ---- routing layout --------------------------------------------------------


def moe_align_block_size(
    topk_idx: torch.Tensor, n_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the A = T*K assignments by expert, each expert's run padded to ``block_m`` rows.

    Returns ``(sorted_ids [n_blocks*block_m] int32, block_expert [n_blocks] int32)``:
    ``sorted_ids`` holds flat assignment indices ``t*K + k`` (``A`` marks padding),
    ``block_expert`` the expert of each block (``-1`` for blocks past the used ones).
    ``n_blocks = (A + min(E, A) * (block_m - 1)) // block_m`` bounds the padded count
    without reading the routing, so nothing waits on the device. ``-1`` ids are dropped.
    """
    flat = topk_idx.reshape(-1).long()  # [A]
    n_assign, dev = flat.numel(), flat.device
    key = torch.where(flat < 0, n_experts, flat)  # skipped assignments sort last
    order = torch.argsort(key, stable=True)  # [A]
    sorted_key = key.gather(0, order)  # (gather, narrow: Python indexing fails on fake CUDA tensors)
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    blocks = (counts.narrow(0, 0, n_experts) + block_m - 1) // block_m  # [E]
    block_end = blocks.cumsum(0)  # [E]
    padded_start = (block_end - blocks) * block_m  # [E] first padded row of each expert
    start = counts.cumsum(0) - counts  # [E+1] first sorted assignment of each expert
    rank = torch.arange(n_assign, device=dev) - start.gather(0, sorted_key)  # [A] position within its expert
    n_blocks = (n_assign + min(n_experts, n_assign) * (block_m - 1)) // block_m
    size = n_blocks * block_m
    pos = torch.where(sorted_key < n_experts, padded_start.gather(0, sorted_key.clamp(max=n_experts - 1)) + rank, size)
    sorted_ids = torch.full((size + 1,), n_assign, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, pos, order.to(torch.int32))
    block_expert = torch.searchsorted(block_end, torch.arange(n_blocks, device=dev), right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return sorted_ids.narrow(0, 0, size), block_expert


# ---- wrappers --------------------------------------------------------------


def _pow2(n: int, lo: int, hi: int) -> int:
    """The power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, 1 << (max(n, 1) - 1).bit_length()))


def _dot_dtype(dtype: torch.dtype):
    # The CPU interpreter computes bf16 dots wrongly; upcast there (fp32 dots are exact).
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


@functools.cache
def _native_e4m3(device: torch.device) -> bool:
    """Whether Triton can load float8e4nv on ``device``: NVIDIA sm_89+ and the CPU interpreter.

    Elsewhere (A100, ROCm) the weights go in as their uint8 bits and the kernel decodes them.
    """
    if device.type != "cuda":
        return True
    return torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 9)


def _need_triton(op: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: triton is not installed; use {op}_ref or select_fused_moe(device)")


# ---- the custom ops: one per Triton launch (see kernels/library.py) --------


def _fp8_weights(w: torch.Tensor) -> torch.Tensor:
    """float8 weights as the kernel reads them on this device: as they are, or their uint8 bits to decode."""
    return w if _native_e4m3(w.device) else w.view(torch.uint8)


@torch.library.custom_op(op_name("fused_moe_gate_up"), mutates_args=())
def fused_moe_gate_up_launch(
    x: torch.Tensor,  # [T, D]
    w13: torch.Tensor,  # [E, 2I, D] x's dtype, or float8_e4m3fn with w13_scale_inv
    w13_scale_inv: torch.Tensor | None,  # [E, ceil(2I/bn), ceil(D/bk)] fp32, FP8 only
    sorted_ids: torch.Tensor,  # [A_pad] int32, from moe_align_block_size
    block_expert: torch.Tensor,  # [A_pad / block_m] int32
    top_k: int,
    block_m: int,
    block_n: int,
    block_k: int,
    scale_bn: int,  # FP8 block (rows, cols); 1 otherwise
    scale_bk: int,
    scale_per_column: bool,
) -> torch.Tensor:
    """Gate and up GEMMs of each row block against its expert, silu(gate) * up: h [A_pad, I] in x's dtype."""
    inter = w13.shape[1] // 2
    fp8 = w13_scale_inv is not None
    w = _fp8_weights(w13) if fp8 else w13
    s = w13_scale_inv if fp8 else w13  # never read without FP8
    h = torch.empty(sorted_ids.numel(), inter, dtype=x.dtype, device=x.device)  # [A_pad, I]
    fused_moe_gate_up_kernel[(block_expert.numel(), triton.cdiv(inter, block_n))](
        x, w, s, h, sorted_ids, block_expert,
        x.shape[0] * top_k, top_k, x.shape[1], inter,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
        s.stride(0), s.stride(1), s.stride(2), h.stride(0), scale_bn, scale_bk,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_DTYPE=_dot_dtype(x.dtype), FP8=fp8,
        SCALE_PER_COLUMN=scale_per_column, DECODE_E4M3=w.dtype == torch.uint8,
    )  # fmt: skip
    return h


def _check_layout(op: str, sorted_ids, block_expert, block_m: int) -> None:
    expect(sorted_ids.dtype == block_expert.dtype == torch.int32, op, "sorted_ids and block_expert must be int32")
    expect(sorted_ids.numel() == block_expert.numel() * block_m, op, "sorted_ids must hold block_m rows per block")


@fused_moe_gate_up_launch.register_fake
def _(x, w13, w13_scale_inv, sorted_ids, block_expert, top_k, block_m, block_n, block_k, scale_bn, scale_bk,
      scale_per_column):  # fmt: skip
    op = "fused_moe_gate_up"
    expect_one_device(op, x=x, w13=w13, w13_scale_inv=w13_scale_inv, sorted_ids=sorted_ids, block_expert=block_expert)
    expect(x.dim() == 2 and w13.dim() == 3 and w13.shape[2] == x.shape[1], op, "x [T, D], w13 [E, 2I, D]")
    fp8 = w13.dtype == torch.float8_e4m3fn
    expect(fp8 == (w13_scale_inv is not None), op, "float8 w13 comes with w13_scale_inv, other dtypes without")
    expect(fp8 or w13.dtype == x.dtype, op, "w13 must have x's dtype")
    _check_layout(op, sorted_ids, block_expert, block_m)
    return x.new_empty(sorted_ids.numel(), w13.shape[1] // 2)


@torch.library.custom_op(op_name("fused_moe_down"), mutates_args=())
def fused_moe_down_launch(
    h: torch.Tensor,  # [A_pad, I]
    w2: torch.Tensor,  # [E, D, I] h's dtype, or float8_e4m3fn with w2_scale_inv
    w2_scale_inv: torch.Tensor | None,  # [E, ceil(D/bn), ceil(I/bk)] fp32, FP8 only
    routing_weights: torch.Tensor,  # [A] fp32, row t*K+k
    sorted_ids: torch.Tensor,  # [A_pad] int32
    block_expert: torch.Tensor,  # [A_pad / block_m] int32
    block_m: int,
    block_n: int,
    block_k: int,
    scale_bn: int,
    scale_bk: int,
    scale_per_column: bool,
) -> torch.Tensor:
    """h @ w2[e]^T times the routing weight, per assignment: ys [A, D] in h's dtype (skipped rows 0)."""
    n_assign, d, inter = routing_weights.numel(), w2.shape[1], w2.shape[2]
    fp8 = w2_scale_inv is not None
    w = _fp8_weights(w2) if fp8 else w2
    s = w2_scale_inv if fp8 else w2  # never read without FP8
    ys = torch.zeros(n_assign, d, dtype=h.dtype, device=h.device)  # [A, D], row t*K+k
    fused_moe_down_kernel[(block_expert.numel(), triton.cdiv(d, block_n))](
        h, w, s, ys, routing_weights, sorted_ids, block_expert,
        n_assign, d, inter,
        h.stride(0), w.stride(0), w.stride(1), w.stride(2),
        s.stride(0), s.stride(1), s.stride(2), ys.stride(0), scale_bn, scale_bk,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_DTYPE=_dot_dtype(h.dtype), FP8=fp8,
        SCALE_PER_COLUMN=scale_per_column, DECODE_E4M3=w.dtype == torch.uint8,
    )  # fmt: skip
    return ys


@fused_moe_down_launch.register_fake
def _(h, w2, w2_scale_inv, routing_weights, sorted_ids, block_expert, block_m, block_n, block_k, scale_bn, scale_bk,
      scale_per_column):  # fmt: skip
    op = "fused_moe_down"
    expect_one_device(op, h=h, w2=w2, w2_scale_inv=w2_scale_inv, routing_weights=routing_weights,
                      sorted_ids=sorted_ids, block_expert=block_expert)  # fmt: skip
    expect(h.dim() == 2 and w2.dim() == 3 and w2.shape[2] == h.shape[1], op, "h [A_pad, I], w2 [E, D, I]")
    fp8 = w2.dtype == torch.float8_e4m3fn
    expect(fp8 == (w2_scale_inv is not None), op, "float8 w2 comes with w2_scale_inv, other dtypes without")
    expect(fp8 or w2.dtype == h.dtype, op, "w2 must have h's dtype")
    expect(routing_weights.dim() == 1 and routing_weights.dtype == torch.float32, op, "routing_weights: fp32 [A]")
    expect(h.shape[0] == sorted_ids.numel(), op, "h must have one row per sorted_ids entry")
    _check_layout(op, sorted_ids, block_expert, block_m)
    return h.new_empty(routing_weights.numel(), w2.shape[1])


def _run(x, w13, w2, topk_idx, topk_weights, *, n_experts, d, inter, fp8=None) -> torch.Tensor:
    """Align, run both kernels, sum over K. ``fp8`` = (w13_scale_inv, w2_scale_inv, (bn, bk)) or None.

    All torch glue, no host sync: the layout comes from moe_align_block_size on the device and the
    tile sizes from shapes only.
    """
    t, top_k = topk_idx.shape
    out = x.new_zeros(t, d)
    if t == 0 or top_k == 0:
        return out
    n_assign = t * top_k
    block_m = _pow2(math.ceil(n_assign / n_experts), 16, 64)
    sorted_ids, block_expert = moe_align_block_size(topk_idx, n_experts, block_m)  # [A_pad], [A_pad / block_m]
    if fp8 is None:
        s13 = s2 = None
        bn = bk = 1
        bk_13 = _pow2(d, 16, 64)
        bk_2 = _pow2(inter, 16, 64)
        per_column = True
    else:
        s13, s2, (bn, bk) = fp8
        # A BK (a power of two >= 16) divides bk iff bk is a multiple of 16: then one scale per column per K step.
        per_column = bk % 16 == 0
        step = bk & -bk if per_column else 32  # largest power of two dividing bk
        bk_13 = min(_pow2(d, 16, 64), step) if per_column else _pow2(d, 16, 32)
        bk_2 = min(_pow2(inter, 16, 64), step) if per_column else _pow2(inter, 16, 32)

    h = fused_moe_gate_up_launch(
        x, w13, s13, sorted_ids, block_expert, top_k, block_m, _pow2(inter, 16, 64), bk_13, bn, bk, per_column
    )  # [A_pad, I]
    rw = topk_weights.reshape(-1).to(torch.float32).contiguous()  # [A]
    ys = fused_moe_down_launch(
        h, w2, s2, rw, sorted_ids, block_expert, block_m, _pow2(d, 16, 64), bk_2, bn, bk, per_column
    )  # [A, D], row t*K+k; skipped rows 0
    return ys.view(t, top_k, d).sum(dim=1, dtype=torch.float32).to(x.dtype)  # [T, D]


def fused_moe(
    x: torch.Tensor,  # [T, D]
    w13: torch.Tensor,  # [E, 2I, D]
    w2: torch.Tensor,  # [E, D, I]
    topk_idx: torch.Tensor,  # [T, K] int, -1 = skip
    topk_weights: torch.Tensor,  # [T, K]
    *,
    check_ids: bool = True,
) -> torch.Tensor:
    """Per token, sum_k w_k * SwiGLU_{e_k}(x) with Triton grouped GEMMs; [T, D] in x's dtype.

    ``check_ids`` validates expert ids on the host (one device sync); pass False when
    the caller already guarantees ids in ``-1..E-1``.
    """
    _need_triton("fused_moe")
    check_x(x)
    n_experts, d, inter = check_weights(x, w13, w2)
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"w13/w2 must have x's dtype {x.dtype}, got {w13.dtype}/{w2.dtype} (FP8: use fused_moe_fp8)")
    check_routing(x, topk_idx, topk_weights, n_experts, check_ids)
    return _run(x, w13, w2, topk_idx, topk_weights, n_experts=n_experts, d=d, inter=inter)


def fused_moe_fp8(
    x: torch.Tensor,  # [T, D]
    w13_q: torch.Tensor,  # [E, 2I, D] float8_e4m3fn
    w13_scale_inv: torch.Tensor,  # [E, ceil(2I/bn), ceil(D/bk)] fp32
    w2_q: torch.Tensor,  # [E, D, I] float8_e4m3fn
    w2_scale_inv: torch.Tensor,  # [E, ceil(D/bn), ceil(I/bk)] fp32
    topk_idx: torch.Tensor,  # [T, K] int, -1 = skip
    topk_weights: torch.Tensor,  # [T, K]
    block: tuple[int, int] = (128, 128),
    *,
    check_ids: bool = True,
) -> torch.Tensor:
    """:func:`fused_moe` with DeepSeek-V3 block-scaled e4m3 weights, dequantized in the K loop."""
    _need_triton("fused_moe_fp8")
    check_x(x)
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"block must be two positive ints (rows, cols), got {block!r}")
    n_experts, d, inter = check_weights(x, w13_q, w2_q)
    check_scales("w13", w13_q, w13_scale_inv, block)
    check_scales("w2", w2_q, w2_scale_inv, block)
    check_routing(x, topk_idx, topk_weights, n_experts, check_ids)
    return _run(
        x, w13_q, w2_q, topk_idx, topk_weights, n_experts=n_experts, d=d, inter=inter,
        fp8=(w13_scale_inv, w2_scale_inv, tuple(block)),
    )  # fmt: skip


# ---- selection -------------------------------------------------------------


def select_fused_moe(device: torch.device | str, force_triton: bool = False, *, fp8: bool = False) -> Callable:
    """The fused-MoE function for ``device``, chosen once: Triton on CUDA (or when forced), torch elsewhere.

    ``fp8=True`` selects the block-scaled FP8 pair (:func:`fused_moe_fp8` / :func:`fused_moe_fp8_ref`).
    """
    triton_ok = use_triton(device, force_triton, "select_fused_moe")
    if fp8:
        return fused_moe_fp8 if triton_ok else fused_moe_fp8_ref
    return fused_moe if triton_ok else fused_moe_ref
