"""One MLA layer's decode step in one C call on CPU (kernels/cpu_mla_layer.c), where it applies.

``cpu_mla_layer`` is ``DenseOps.mla_layer`` on CPU: attn_node/model.py's ``MLA.forward`` asks it first and runs
its own ops when it answers None. It applies to decode steps (one group of one query per sequence, absorbed)
of the dense-attention checkpoints (no V3.2 indexer) with fp32 activations, cache and small parameters over
projections kept fp32, bf16 or fp16. The C function makes the very calls the unfused CPU path makes
(kernels/cpu_paths.py: linear, rmsnorm, rope, store_latent, mla_decode) in the same order, so its output and
the cache it writes are that path's to the bit (tests/kernels/test_cpu_mla_layer.py); it saves the ~30 torch
ops and 8 ctypes calls between them, which at decode sizes cost more than their arithmetic.

The module is read by DeepSeek's names (``wq`` or ``wq_a``/``q_norm``/``wq_b``, ``wkv_a``, ``kv_norm``,
``wkv_b``, ``wo``, ``n_heads``, ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``kv_lora_rank``, ``v_head_dim``,
``softmax_scale``, ``indexer``): kernels import no role, so the model is passed in, not imported.
"""

from __future__ import annotations

import ctypes

import torch

from . import cpu_kernels
from .cpu_paths import KERNEL_MAX_ROWS_HALF

_p, _f, _i32, _i64 = ctypes.c_void_p, ctypes.c_float, ctypes.c_int32, ctypes.c_int64


class MlaWeights(ctypes.Structure):
    """kernels/cpu_mla_layer.c's ``mm_mla_weights``."""

    _fields_ = [("wq", _p), ("wq_a", _p), ("wq_b", _p), ("wkv_a", _p), ("wo", _p),
                ("q_norm", _p), ("kv_norm", _p), ("wkv_b", _p), ("q_eps", _f), ("kv_eps", _f), ("scale", _f),
                ("wdtype", _i32), ("interleave", _i32),
                ("D", _i64), ("Lq", _i64), ("H", _i64), ("N", _i64), ("R", _i64), ("C", _i64), ("V", _i64)]


class MlaStep(ctypes.Structure):
    """kernels/cpu_mla_layer.c's ``mm_mla_step``."""

    _fields_ = [("x", _p), ("cos_t", _p), ("sin_t", _p), ("cache", _p), ("y", _p),
                ("slot_mapping", _p), ("token_index", _p), ("block_tables", _p), ("context_lens", _p),
                ("out_rows", _p), ("T", _i64), ("B", _i64), ("ldc", _i64), ("n_slots", _i64),
                ("max_blocks", _i64), ("block_size", _i64), ("max_s", _i64)]


BAD_TABLES = {1: "token_index", 2: "out_rows", 3: "block_tables"}
_weights_cache: dict[tuple, MlaWeights] = {}  # per layer: its pointers and shapes, built once


def _fp32_cpu(*ts: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in ts)


def _layer_weights(mla, interleave: bool) -> MlaWeights | None:
    """The layer's weight struct (cached by its pointers and shapes); None where the kernel does not take them."""
    projections = ([mla.wq.weight] if mla.q_lora_rank is None else [mla.wq_a.weight, mla.wq_b.weight]) + \
        [mla.wkv_a.weight, mla.wo.weight]
    code = cpu_kernels.WEIGHT_CODES.get(projections[0].dtype)
    if code is None or any(w.dtype != projections[0].dtype or w.device.type != "cpu" or not w.is_contiguous()
                           for w in projections):
        return None
    small = [mla.kv_norm.weight, mla.wkv_b.weight] + ([] if mla.q_lora_rank is None else [mla.q_norm.weight])
    if not _fp32_cpu(*small):
        return None
    key = (*(w.data_ptr() for w in projections + small), code, interleave, mla.n_heads, mla.qk_nope_head_dim,
           mla.qk_rope_head_dim, mla.kv_lora_rank, mla.v_head_dim, mla.softmax_scale, mla.kv_norm.eps)
    weights = _weights_cache.get(key)
    if weights is None:
        q_lora = mla.q_lora_rank is not None
        weights = MlaWeights(
            wq=None if q_lora else mla.wq.weight.data_ptr(), wq_a=mla.wq_a.weight.data_ptr() if q_lora else None,
            wq_b=mla.wq_b.weight.data_ptr() if q_lora else None, wkv_a=mla.wkv_a.weight.data_ptr(),
            wo=mla.wo.weight.data_ptr(), q_norm=mla.q_norm.weight.data_ptr() if q_lora else None,
            kv_norm=mla.kv_norm.weight.data_ptr(), wkv_b=mla.wkv_b.weight.data_ptr(),
            q_eps=mla.q_norm.eps if q_lora else 0.0, kv_eps=mla.kv_norm.eps, scale=mla.softmax_scale, wdtype=code,
            interleave=int(interleave), D=mla.wkv_a.weight.shape[1], Lq=mla.q_lora_rank or 0, H=mla.n_heads,
            N=mla.qk_nope_head_dim, R=mla.qk_rope_head_dim, C=mla.kv_lora_rank, V=mla.v_head_dim)
        if len(_weights_cache) > 4096:  # models built and dropped again and again (tests): forget the old ones
            _weights_cache.clear()
        _weights_cache[key] = weights
    return weights


def cpu_mla_layer(mla, x: torch.Tensor, rope, batch, kv_cache: torch.Tensor) -> torch.Tensor | None:
    """``mla.forward(x, rope, batch, kv_cache)`` ([T, D] fp32) for a decode step in one C call, the latent
    stored in ``kv_cache`` as the unfused path stores it; None where the call does not apply (the caller runs
    its ops)."""
    if mla.indexer is not None or len(batch.groups) != 1 or not cpu_kernels.available():
        return None
    g = batch.groups[0]
    T = x.shape[0]
    rotary, cos, sin = rope
    if (not g.absorbed or g.token_index.dim() != 2 or g.token_index.shape[1] != 1 or x.dim() != 2
            or not 0 < T <= KERNEL_MAX_ROWS_HALF or not _fp32_cpu(x, cos, sin, kv_cache)
            or kv_cache.dim() != 2 or kv_cache.shape[1] != mla.latent_dim):
        return None
    tables = (batch.slot_mapping, g.token_index, g.block_tables, g.context_lens, batch.out_rows)
    if any(t.dtype != torch.int64 or t.device.type != "cpu" or not t.is_contiguous() for t in tables):
        return None
    weights = _layer_weights(mla, rotary.interleave)
    if weights is None:
        return None
    B = g.token_index.shape[0]
    if tuple(cos.shape) != (T, mla.qk_rope_head_dim // 2) or tuple(sin.shape) != tuple(cos.shape) \
            or x.shape[1] != weights.D or batch.out_rows.shape != (T,) or batch.slot_mapping.shape != (T,) \
            or g.context_lens.shape != (B,) or g.block_tables.dim() != 2 or g.block_tables.shape[0] != B:
        raise ValueError(f"a decode step's tensors disagree: x {list(x.shape)}, cos {list(cos.shape)}, out_rows "
                         f"{list(batch.out_rows.shape)}, slot_mapping {list(batch.slot_mapping.shape)}, "
                         f"{B} sequences")
    y = torch.empty(T, weights.D, dtype=torch.float32, device=x.device)
    step = MlaStep(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), kv_cache.data_ptr(), y.data_ptr(),
                   *(t.data_ptr() for t in tables), T, B, kv_cache.stride(0), kv_cache.shape[0],
                   g.block_tables.shape[1], g.block_size, g.ctx_slots.shape[1])
    bad = cpu_kernels.mla_layer(ctypes.byref(weights), ctypes.byref(step), torch.get_num_threads())
    if bad >= 100:
        t = bad - 100
        raise IndexError(f"slot_mapping[{t}] = {int(batch.slot_mapping[t])} is past the cache's "
                         f"{kv_cache.shape[0]} slots")
    if bad > 0:
        raise IndexError(f"{BAD_TABLES[bad]} of a decode step points outside the batch or the cache")
    return y
