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
import weakref

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
# per MLA module: (its weight tensors as last read, their addresses, interleave, the struct): the per-call check
_by_module: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fp32_cpu(*ts: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in ts)


def _weight_tensors(mla) -> tuple[torch.Tensor, ...]:
    """The layer's weights: its projections ([wq] or [wq_a, wq_b], wkv_a, wo), then kv_norm, wkv_b (and q_norm).

    Read through the modules' own ``_modules`` and ``_parameters`` dicts: nn.Module's ``__getattr__`` costs
    ~0.6 us a name, and a decode step would pay it for 14-18 names per layer."""
    mods = mla._modules
    names = ("wq",) if mla.q_lora_rank is None else ("wq_a", "wq_b")
    names += ("wkv_a", "wo", "kv_norm", "wkv_b") + (() if mla.q_lora_rank is None else ("q_norm",))
    return tuple(mods[n]._parameters["weight"] for n in names)


def _layer_weights(mla, interleave: bool) -> MlaWeights | None:
    """The layer's weight struct; None where the kernel does not take its weights. Built once per module and
    reused while the module holds the same tensors at the same addresses (a loader may swap either)."""
    tensors = _weight_tensors(mla)
    held = _by_module.get(mla)
    if held is not None and held[2] == interleave and len(held[0]) == len(tensors) and all(
            a is b and a.data_ptr() == p for a, b, p in zip(tensors, held[0], held[1])):
        return held[3]
    weights = _build_layer_weights(mla, tensors, interleave)
    _by_module[mla] = (tensors, tuple(t.data_ptr() for t in tensors), interleave, weights)
    return weights


def _build_layer_weights(mla, tensors: tuple[torch.Tensor, ...], interleave: bool) -> MlaWeights | None:
    """The layer's weight struct over ``tensors`` (:func:`_weight_tensors`' order); None where the kernel does not
    take them."""
    q_lora = mla.q_lora_rank is not None
    n_proj = 4 if q_lora else 3
    projections, small = tensors[:n_proj], tensors[n_proj:]
    code = cpu_kernels.WEIGHT_CODES.get(projections[0].dtype)
    if code is None or any(w.dtype != projections[0].dtype or w.device.type != "cpu" or not w.is_contiguous()
                           for w in projections):
        return None
    if not _fp32_cpu(*small):
        return None
    addr = dict(zip(("wq_a", "wq_b") if q_lora else ("wq",), (t.data_ptr() for t in projections)))
    wkv_a, wo = projections[-2:]
    kv_norm, wkv_b = small[:2]
    return MlaWeights(
        wq=addr.get("wq"), wq_a=addr.get("wq_a"), wq_b=addr.get("wq_b"), wkv_a=wkv_a.data_ptr(), wo=wo.data_ptr(),
        q_norm=small[2].data_ptr() if q_lora else None, kv_norm=kv_norm.data_ptr(), wkv_b=wkv_b.data_ptr(),
        q_eps=mla.q_norm.eps if q_lora else 0.0, kv_eps=mla.kv_norm.eps, scale=mla.softmax_scale, wdtype=code,
        interleave=int(interleave), D=wkv_a.shape[1], Lq=mla.q_lora_rank or 0, H=mla.n_heads,
        N=mla.qk_nope_head_dim, R=mla.qk_rope_head_dim, C=mla.kv_lora_rank, V=mla.v_head_dim)


def _step_fields(batch, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int):
    """What a decode step's MLA layers share (every layer gets the same batch and rope): (the tables' addresses,
    B, max blocks, block size, longest context) once the step's tensors pass the kernel's checks; None where
    the call does not apply; ValueError where they disagree. Checked once per step (per micro-batch: they
    interleave), not per layer: the answers of the last few are kept with the very objects they were made for,
    the tables included (an AttnBatch and its groups are frozen: the same batch holds the same tables, and a
    kept entry keeps them alive, so their addresses stay theirs)."""
    held = _recent_steps
    for entry in held:
        if entry[0] is batch and entry[1] is cos and entry[2] is sin:
            return entry[3]
    fields = _check_step(batch, cos, sin, rope_dim)
    # replaced whole: a reader on another thread sees the old tuple or the new one
    globals()["_recent_steps"] = ((batch, cos, sin, fields), *held[:_RECENT_STEPS - 1])
    return fields


def _check_step(batch, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int):
    if len(batch.groups) != 1:
        return None
    g = batch.groups[0]
    if batch.slot_mapping.dim() != 1:
        raise ValueError(f"slot_mapping must be [T], got {list(batch.slot_mapping.shape)}")
    T = batch.slot_mapping.shape[0]
    if (not g.absorbed or g.token_index.dim() != 2 or g.token_index.shape[1] != 1
            or not 0 < T <= KERNEL_MAX_ROWS_HALF or not _fp32_cpu(cos, sin)):
        return None
    tables = (batch.slot_mapping, g.token_index, g.block_tables, g.context_lens, batch.out_rows)
    if any(t.dtype != torch.int64 or t.device.type != "cpu" or not t.is_contiguous() for t in tables):
        return None
    B = g.token_index.shape[0]
    if tuple(cos.shape) != (T, rope_dim // 2) or tuple(sin.shape) != tuple(cos.shape) \
            or batch.out_rows.shape != (T,) or g.context_lens.shape != (B,) or g.block_tables.dim() != 2 \
            or g.block_tables.shape[0] != B:
        raise ValueError(f"a decode step's tensors disagree: cos {list(cos.shape)}, out_rows "
                         f"{list(batch.out_rows.shape)}, slot_mapping {list(batch.slot_mapping.shape)}, "
                         f"{B} sequences")
    return (tuple(t.data_ptr() for t in tables), T, B, g.block_tables.shape[1], g.block_size, g.ctx_slots.shape[1],
            tables)  # the tensors last: the memo keeps them (their addresses) alive


_RECENT_STEPS = 4  # micro-batches a step interleaves (ping-pong: 2), with room to spare
_recent_steps: tuple = ()  # ((batch, cos, sin, their _step_fields), ...), newest first


def cpu_mla_layer(mla, x: torch.Tensor, rope, batch, kv_cache: torch.Tensor) -> torch.Tensor | None:
    """``mla.forward(x, rope, batch, kv_cache)`` ([T, D] fp32) for a decode step in one C call, the latent
    stored in ``kv_cache`` as the unfused path stores it; None where the call does not apply (the caller runs
    its ops)."""
    if mla.indexer is not None or not cpu_kernels.available():
        return None
    rotary, cos, sin = rope
    step_fields = _step_fields(batch, cos, sin, mla.qk_rope_head_dim)
    if step_fields is None or x.dim() != 2 or not _fp32_cpu(x, kv_cache) or kv_cache.dim() != 2 \
            or kv_cache.shape[1] != mla.latent_dim:
        return None
    weights = _layer_weights(mla, rotary.interleave)
    if weights is None:
        return None
    tables, T, B, max_blocks, block_size, max_s, _ = step_fields
    if tuple(x.shape) != (T, weights.D):
        raise ValueError(f"a decode step's tensors disagree: x {list(x.shape)} for {T} rows of {weights.D}")
    y = torch.empty(T, weights.D, dtype=torch.float32, device=x.device)
    step = MlaStep(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), kv_cache.data_ptr(), y.data_ptr(), *tables, T, B,
                   kv_cache.stride(0), kv_cache.shape[0], max_blocks, block_size, max_s)
    bad = cpu_kernels.mla_layer(ctypes.byref(weights), ctypes.byref(step), torch.get_num_threads())
    if bad >= 100:
        t = bad - 100
        raise IndexError(f"slot_mapping[{t}] = {int(batch.slot_mapping[t])} is past the cache's "
                         f"{kv_cache.shape[0]} slots")
    if bad > 0:
        raise IndexError(f"{BAD_TABLES[bad]} of a decode step points outside the batch or the cache")
    return y
