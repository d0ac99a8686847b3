"""The op set the engine calls, chosen once at construction: Triton kernels on CUDA, references elsewhere.

``select_ops(device, mode)``: ``auto`` = Triton on CUDA devices, the plain-torch
references on CPUs; ``triton`` forces the kernels (on CPU they then run in
Triton's interpreter, ``TRITON_INTERPRET=1`` set before triton is imported);
``reference`` forces the references. Model code never branches on the backend or the device:
it calls these functions. ``Ops.dense`` (:class:`DenseOps`) holds the dense layers' calls, chosen by the
weights' device alone: on CPU the C kernels of kernels/cpu_gemv.c (kernels/cpu_paths.py) for decode-sized
fp32 rows, torch elsewhere.

The Triton ops in :class:`Ops` never read device data on the host (the decode hot path runs
without syncs): their checks read shapes only, and the fused-MoE pair is bound with
``check_ids=False`` (the caller's routing guarantees ids in -1..E-1; the direct API keeps
``check_ids=True`` as its default). ``mla_decode`` takes ``max_context_len=`` (the longest
context, known on the host): the kernel sizes its splits with it, and the reference, which
otherwise reads ``context_lens`` on the host, sizes its gather with it. ``sparse_mla_decode`` (V3.2)
gathers the indexer's top-k positions, a shape, so neither path reads anything on the host. The references are the
CPU path and the oracle; ``store_latent_ref`` and ``fused_moe_ref`` select rows by data
(boolean masks, ``unique``), which costs nothing on a CPU. On CPU the latent store is one C call
(``cpu_paths.cpu_store_latent``: the reference's bits, the reference where the kernel does not apply).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache_store import select_store_latent
from .cpu_mla_layer import cpu_mla_layer
from .cpu_paths import cpu_linear, cpu_mla_decode, cpu_rmsnorm, cpu_rope, cpu_store_latent, cpu_swiglu
from .fused_moe import select_fused_moe
from .mla_decode import select_mla_decode
from .routing import select_route
from .sparse_mla_decode import select_sparse_mla_decode

KERNEL_MODES = ("auto", "triton", "reference")


def _not_fused(*_args, **_kwargs) -> None:
    """No fused call here: the caller runs its torch ops."""
    return None


def _torch_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _torch_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


@dataclass(frozen=True)
class DenseOps:
    """The dense layers' calls, chosen once for the model's device (kernels/ops.py ``select_ops``).

    ``linear`` (x, w) -> x w^T and ``swiglu`` (x, w1, w3, w2) -> w2 (silu(w1 x) * w3 x) always answer;
    ``rms_norm`` (x, weight, eps), ``rope`` (x, cos, sin, interleave) and ``mla_decode`` (the absorbed decode,
    :func:`cpu_mla_decode`'s arguments) answer None where they have no fused call for these tensors, and the
    model then runs its own torch ops (the reference the fused calls are tested against); so does ``mla_layer``
    (mla, x, rope, batch, kv_cache): a whole MLA layer's decode step (kernels/cpu_mla_layer.py)."""

    linear: Callable
    swiglu: Callable
    rms_norm: Callable
    rope: Callable
    mla_decode: Callable
    mla_layer: Callable


TORCH_DENSE = DenseOps(linear=_torch_linear, swiglu=_torch_swiglu, rms_norm=_not_fused, rope=_not_fused,
                       mla_decode=_not_fused, mla_layer=_not_fused)
# On CPU: the C kernels for decode-sized fp32 rows, each falling back to torch where it does not apply
CPU_DENSE = DenseOps(linear=cpu_linear, swiglu=cpu_swiglu, rms_norm=cpu_rmsnorm, rope=cpu_rope,
                     mla_decode=cpu_mla_decode, mla_layer=cpu_mla_layer)


def select_dense(device: torch.device) -> DenseOps:
    return CPU_DENSE if device.type == "cpu" else TORCH_DENSE


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
    # linears, SwiGLU MLPs, norms, RoPE and the absorbed MLA decode: the CPU's C kernels on CPU (also under
    # ``reference``: they are checked against these torch ops, and plain torch cannot run fp32 rows over
    # half-precision weights without widening each weight per call), torch elsewhere
    dense: DenseOps


def _without_id_check(fn: Callable) -> Callable:
    """The fused-MoE op with its host-side id check off by default (a caller may still pass check_ids=True)."""
    return functools.partial(fn, check_ids=False)


def select_ops(device: torch.device | str = "cpu", mode: str = "auto") -> Ops:
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    device = device_of_weights = torch.device(device)
    if mode == "reference":
        device, force = torch.device("cpu"), False
    else:
        force = mode == "triton"
    triton_moe = force or device.type == "cuda"
    return Ops(
        mla_decode=select_mla_decode(device, force),
        sparse_mla_decode=select_sparse_mla_decode(device, force),
        # on CPU one C call per layer (the reference's bits; the reference where the kernel does not apply)
        store_latent=cpu_store_latent if device.type == "cpu" and not force else select_store_latent(device, force),
        route=select_route(device, force),
        # On CPUs the shard's own strategies (padded bmm / busy-expert loop) beat a reference loop.
        fused_moe=_without_id_check(select_fused_moe(device, force)) if triton_moe else None,
        fused_moe_fp8=_without_id_check(select_fused_moe(device, force, fp8=True)),
        mode="triton" if (force or device.type == "cuda") else "reference",
        dense=select_dense(device_of_weights),
    )
