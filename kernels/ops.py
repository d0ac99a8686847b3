"""The op set the engine calls, chosen once at construction: Triton kernels on CUDA, references elsewhere.

``select_ops(device, mode)``: ``auto`` = Triton on CUDA devices, the plain-torch
references on CPUs; ``triton`` forces the kernels (on CPU they then run in
Triton's interpreter, ``TRITON_INTERPRET=1`` set before triton is imported);
``reference`` forces the references. Model code never branches on the backend:
it calls these functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cache_store import select_store_latent
from .fused_moe import select_fused_moe
from .mla_decode import select_mla_decode
from .routing import select_route

KERNEL_MODES = ("auto", "triton", "reference")


@dataclass(frozen=True)
class Ops:
    mla_decode: Callable  # (q_c, q_pe, kv_cache, block_tables, context_lens, block_size, softmax_scale) -> o_c
    store_latent: Callable  # (kv_cache, c_kv, k_pe, slot_mapping) -> None, in place
    route: Callable  # (logits, *, top_k, scoring_func, topk_method, ...) -> (topk_idx, topk_weights)
    fused_moe: Callable | None  # (x, w13, w2, topk_idx, topk_weights) -> y; None = the shard's CPU strategies
    mode: str


def select_ops(device: torch.device | str = "cpu", mode: str = "auto") -> Ops:
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    device = torch.device(device)
    if mode == "reference":
        device, force = torch.device("cpu"), False
    else:
        force = mode == "triton"
    triton_moe = force or device.type == "cuda"
    return Ops(
        mla_decode=select_mla_decode(device, force),
        store_latent=select_store_latent(device, force),
        route=select_route(device, force),
        # On CPUs the shard's own strategies (padded bmm / busy-expert loop) beat a reference loop.
        fused_moe=select_fused_moe(device, force) if triton_moe else None,
        mode="triton" if (force or device.type == "cuda") else "reference",
    )
