"""Plain-torch references of kernels/fused_moe.py's ops: the CPU path, and the oracle its tests compare against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe_ref(
    x: torch.Tensor,  # [T, D]
    w13: torch.Tensor,  # [E, 2I, D]
    w2: torch.Tensor,  # [E, D, I]
    topk_idx: torch.Tensor,  # [T, K] int, -1 = skip
    topk_weights: torch.Tensor,  # [T, K]
    **_: object,
) -> torch.Tensor:
    """Plain torch: a loop over the experts that have rows; GEMMs in x's dtype, the sum in fp32."""
    inter = w2.shape[-1]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)  # [T, D]
    for e in topk_idx[topk_idx >= 0].unique().tolist():
        rows, slot = (topk_idx == e).nonzero(as_tuple=True)  # [n], [n]
        gate_up = x[rows] @ w13[e].to(x.dtype).t()  # [n, 2I]
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [n, I]
        y = h @ w2[e].to(x.dtype).t()  # [n, D]
        out.index_add_(0, rows, y.float() * topk_weights[rows, slot].float()[:, None])
    return out.to(x.dtype)


def _dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    from moemesh.model.checkpoint import dequantize_fp8_blockwise

    return torch.stack([dequantize_fp8_blockwise(q[e], scale_inv[e], tuple(block)) for e in range(q.shape[0])])


def fused_moe_fp8_ref(
    x: torch.Tensor,
    w13_q: torch.Tensor,
    w13_scale_inv: torch.Tensor,
    w2_q: torch.Tensor,
    w2_scale_inv: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    **_: object,
) -> torch.Tensor:
    """Dequantize the weights to x's dtype (moemesh.model.checkpoint's one dequantization), then :func:`fused_moe_ref`."""
    w13 = _dequantize(w13_q, w13_scale_inv, block).to(x.dtype)
    w2 = _dequantize(w2_q, w2_scale_inv, block).to(x.dtype)
    return fused_moe_ref(x, w13, w2, topk_idx, topk_weights)
