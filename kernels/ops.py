"""The op set the engine calls, chosen once at construction: Triton kernels on CUDA, references elsewhere.

``select_ops(device, mode)``: ``auto`` = Triton on CUDA devices, the plain-torch
references on CPUs; ``triton`` forces the kernels (on CPU they then run in
Triton's interpreter, ``TRITON_INTERPRET=1`` set before triton is imported);
``reference`` forces the references. Model code never branches on the backend:
it calls these functions.

The Triton ops in :class:`Ops` never read device data on the host (the decode hot path runs
without syncs): their checks read shapes only, and the fused-MoE pair is bound with
``check_ids=False`` (the caller's routing guarantees ids in -1..E-1; the direct API keeps
``check_ids=True`` as its default). ``mla_decode`` takes ``max_context_len=`` (the longest
context, known on the host): the kernel sizes its splits with it, and the reference, which
otherwise reads ``context_lens`` on the host, sizes its gather with it. ``sparse_mla_decode`` (V3.2)
gathers the indexer's top-k positions, a shape, so neither path reads anything on the host. The references are the
CPU path and the oracle; ``store_latent_ref`` and ``fused_moe_ref`` select rows by data
(boolean masks, ``unique``), which costs nothing on a CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cache_store import select_store_latent
from .fused_moe import select_fused_moe
from .mla_decode import select_mla_decode
from .routing import select_route
from .sparse_mla_decode import select_sparse_mla_decode

KERNEL_MODES = ("auto", "triton", "reference")


@dataclass(frozen=True)
class Ops:
    # (q_c, q_pe, kv_cache, block_tables, context_lens, block_size, softmax_scale, *, max_context_len=None) -> o_c
    mla_decode: Callable
    # (q_c, q_pe, kv_cache, block_tables, context_lens, indices [B, topk], block_size, softmax_scale) -> o_c;
    # V3.2's decode over each query's selected positions only
    sparse_mla_decode: Callable
    store_latent: Callable  # (kv_cache, c_kv, k_pe, slot_mapping) -> None, in place
    route: Callable  # (logits, *, top_k, scoring_func, topk_method, ...) -> (topk_idx, topk_weights)
    fused_moe: Callable | None  # (x, w13, w2, topk_idx, topk_weights) -> y; None = the shard's CPU strategies
    # (x, w13_q, w13_scale_inv, w2_q, w2_scale_inv, topk_idx, topk_weights, block, *, check_ids=False) -> y;
    # the Triton kernel on CUDA, the dequantizing reference on CPU (FP8-kept weights, e.g. --fp8 keep)
    fused_moe_fp8: Callable
    mode: str


def _without_id_check(fn: Callable) -> Callable:
    """The fused-MoE op with its host-side id check off by default (a caller may still pass check_ids=True)."""
    return functools.partial(fn, check_ids=False)


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
        sparse_mla_decode=select_sparse_mla_decode(device, force),
        store_latent=select_store_latent(device, force),
        route=select_route(device, force),
        # On CPUs the shard's own strategies (padded bmm / busy-expert loop) beat a reference loop.
        fused_moe=_without_id_check(select_fused_moe(device, force)) if triton_moe else None,
        fused_moe_fp8=_without_id_check(select_fused_moe(device, force, fp8=True)),
        mode="triton" if (force or device.type == "cuda") else "reference",
    )
