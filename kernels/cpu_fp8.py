"""FP8-kept routed experts on CPU (``--fp8 auto`` where the kernels build, or ``keep``): DeepSeek-V3's e4m3
weights stay one byte each in RAM.

The C side (kernels/cpu_gemv.c ``mm_moe_forward_fp8``) is ``mm_moe_forward`` with each 4-row block of
weights dequantized into L1 as it streams, then multiplied as fp32 weights: :func:`moe_forward` has the bits
of ``cpu_kernels.moe_forward`` over the checkpoint's dequantized fp32 weights (moemesh.model.checkpoint's one
dequantization), read at half the bytes of bf16. A shard matches its dequantized twin bit for bit where the
twin takes that kernel too (decode-sized batches) and the intermediate size needs no padding to whole
blocks (DeepSeek-V3's 2048 in 128 blocks); otherwise to fp32 rounding (the sums run in another order). What
it costs, measured on this kind of machine, is in kernels/README.md.
"""

from __future__ import annotations

import torch

from . import cpu_kernels
from .cpu_kernels import _CPU, _allocated, _check_table, _lib, check_routing, expert_shapes


def _check_fp8(name: str, q: torch.Tensor, scale_inv: torch.Tensor, dims: int, block: tuple[int, int]) -> None:
    """``q`` a contiguous CPU e4m3 tensor of ``dims`` dims; ``scale_inv`` its fp32 block grid (last two dims)."""
    if q.dtype != torch.float8_e4m3fn or q.device.type != "cpu" or not q.is_contiguous() or q.dim() != dims:
        raise ValueError(f"{name} must be a contiguous {dims}-d float8_e4m3fn CPU tensor, got {list(q.shape)} "
                         f"{q.dtype} on {q.device}")
    rows, cols = q.shape[-2:]
    grid = (*q.shape[:-2], -(-rows // block[0]), -(-cols // block[1]))
    _check_table(f"{name}'s scale_inv", scale_inv, torch.float32, grid)


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    bn, bk = (int(b) for b in block)
    if bn < 1 or bk < 1:
        raise ValueError(f"FP8 block must be two positive sizes, got {block}")
    return bn, bk


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """[N, K] e4m3 with its [ceil(N/bn), ceil(K/bk)] fp32 scales -> [N, K] fp32, as the kernel reads it
    (equal, bit for bit, to moemesh.model.checkpoint.dequantize_fp8_blockwise)."""
    lib = _lib()
    bn, bk = _check_block(block)
    _check_fp8("q", q, scale_inv, 2, (bn, bk))
    out = torch.empty(q.shape, dtype=torch.float32, device=_CPU)
    lib.mm_dequant_fp8(q.data_ptr(), scale_inv.data_ptr(), q.shape[0], q.shape[1], bn, bk, out.data_ptr())
    return out


def moe_forward(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, slot_of: torch.Tensor,
                w13: torch.Tensor, w13_scale_inv: torch.Tensor, w2: torch.Tensor, w2_scale_inv: torch.Tensor,
                block: tuple[int, int], threads: int | None = None) -> torch.Tensor:
    """:func:`cpu_kernels.moe_forward` over FP8 experts: ``w13`` [E_l, 2I, D] and ``w2`` [E_l, D, I]
    float8_e4m3fn with fp32 ``w13_scale_inv`` [E_l, ceil(2I/bn), ceil(D/bk)] and ``w2_scale_inv``
    [E_l, ceil(D/bn), ceil(I/bk)] (``block`` = (bn, bk)) -> [T, D] fp32."""
    lib = _lib()
    bn, bk = _check_block(block)
    _check_fp8("w13", w13, w13_scale_inv, 3, (bn, bk))
    _check_fp8("w2", w2, w2_scale_inv, 3, (bn, bk))
    n_slots, d, inter = expert_shapes(w13, w2)
    t, k = check_routing(x, topk_idx, topk_weights, slot_of, d)
    out = torch.empty(t, d, dtype=torch.float32, device=_CPU)
    _allocated(lib.mm_moe_forward_fp8(x.data_ptr(), x.stride(0), t, topk_idx.data_ptr(), topk_weights.data_ptr(), k,
                                      slot_of.data_ptr(), slot_of.shape[0], n_slots, w13.data_ptr(),
                                      w13_scale_inv.data_ptr(), w2.data_ptr(), w2_scale_inv.data_ptr(), bn, bk, d, inter,
                                      out.data_ptr(), threads or torch.get_num_threads()), t)
    return out


def resolve_keep_fp8(mode: str, device: torch.device) -> bool:
    """``moemesh.devices.keep_fp8`` told whether this kernel is here (asked, which builds it, only where it
    decides: ``auto`` on a CPU), as ``cpu_kernels.resolve_weights_dtype`` tells ``resolve_dtype``."""
    from moemesh.devices import keep_fp8

    here = mode == "auto" and device.type == "cpu" and cpu_kernels.available()
    return keep_fp8(mode, device, cpu_kernels=here)
