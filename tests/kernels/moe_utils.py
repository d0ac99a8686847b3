"""Helpers for the fused-MoE and routing kernel tests (interpreter handling lives in kernel_utils)."""

from __future__ import annotations

import torch
from .kernel_utils import interpreting, kernel_device  # noqa: F401  (re-exported for the test modules)
from .kernel_utils import load_kernel_module as kernel_module  # noqa: F401

# (atol, rtol) of a kernel against its torch reference on the same inputs.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol)


def sort_by_expert(idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (ids, weights) ordered by expert id, so routings compare as sets."""
    ids, order = idx.cpu().sort(dim=1)
    return ids, weights.cpu().float().gather(1, order)


def sorted_experts_ref(xs: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """float64 ``moe_swiglu``: rows ``offs[s]:offs[s+1]`` of ``xs`` through expert ``s`` ([E, 2I, D] gate;up,
    [E, D, I] down), rounded to fp32 once at the end."""
    inter, out = w2.shape[-1], []
    for s in range(w13.shape[0]):
        x = xs[offs[s]:offs[s + 1]].double()
        gu = x @ w13[s].double().t()
        out.append((torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]) @ w2[s].double().t())
    return torch.cat(out).float()
