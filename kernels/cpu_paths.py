"""Which CPU path computes a product over weights read once, per shape; and the mixed-dtype linear.

Pure choosers (no I/O, exact-output tests in tests/kernels/test_cpu_paths.py) from the figures of
scripts/bench_cpu_experts.py on 2 cores: the C kernel (kernels/cpu_gemv.c) streams weights at or near
the machine's read bandwidth for the decode-sized rows it is written for, in fp32 and widened from bf16/fp16
alike; torch's GEMMs win on fp32 weights only once many rows share each weight (prefill), and torch has no
fast path at all for fp32 activations over half-precision weights (it must materialise an fp32 copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .cache_store import _check_inputs, store_latent_ref

# Rows per expert up to which the kernel is at least as fast as torch, from interleaved
# runs of scripts/bench_cpu_experts.py on the 2-core dev machine (heavily shared when measured: the
# ratios, not the GB/s, carry over). fp32 weights: the kernel matched or beat one bmm over all experts
# up to 16 rows; past that torch's blocked GEMM (AVX-512 where present) reuses each weight better.
KERNEL_MAX_ROWS_FP32 = 16
# Half-precision weights: torch must first copy the weight to fp32 (6 bytes moved per 2 read), and was
# 3-6x slower than the kernel at 1-16 rows and even at 64; past 64 the copy amortises.
KERNEL_MAX_ROWS_HALF = 64


# bf16 experts on AMX tiles (kernels/cpu_amx.c) from this many rows per expert: where the AVX-512 kernel turns
# bound by arithmetic. Measured with scripts/bench_cpu_experts.py --dtypes bfloat16 --rows 1 4 8 12 16 (64 experts
# of the miniature, every expert given the same rows, 2 threads), GB/s of weights, AVX-512 kernel / AMX: 24.7 /
# 14.2 at 1 row, 15.8 / 14.1 at 8, 11.6 / 13.9 at 12, 9.9 / 13.7 at 16 (AMX's tile loads stream cold weights
# slower than AVX-512 loads, so few rows stay on the AVX-512 kernel).
AMX_MIN_ROWS = 12


def amx_fits(d: int, inter: int) -> bool:
    """Whether experts of this hidden and intermediate size tile for AMX (k in whole tiles of 32, rows in 16s)."""
    return d % 32 == 0 and inter % 32 == 0


def choose_expert_path(max_rows: int, weight_dtype: torch.dtype, kernel_ok: bool, amx_ok: bool = False) -> str:
    """``kernel`` (one C call per layer over every busy expert), ``amx`` (the same on AMX tiles) or ``torch``
    (the shard's torch strategies).

    ``max_rows``: the most rows any one expert has in this batch. ``amx_ok``: AMX can run here
    (``cpu_kernels.amx_ready()``) and the experts' shapes tile (:func:`amx_fits`); it serves bf16 weights only.
    """
    if not kernel_ok or weight_dtype not in cpu_kernels.WEIGHT_CODES:
        return "torch"
    if amx_ok and weight_dtype == torch.bfloat16 and max_rows >= AMX_MIN_ROWS:
        return "amx"
    limit = KERNEL_MAX_ROWS_FP32 if weight_dtype == torch.float32 else KERNEL_MAX_ROWS_HALF
    return "kernel" if max_rows <= limit else "torch"


def choose_linear_path(weight_dtype: torch.dtype, kernel_ok: bool) -> str:
    """How a CPU linear with fp32 rows runs: ``kernel``, ``torch`` (F.linear, same dtypes) or ``upcast``
    (F.linear over an fp32 copy of a half-precision weight).

    The kernel takes every batch it can, prefill included: it sums each row in one order whatever the row count
    (kernels/cpu_gemv.c tiles the rows), so a row's bits never depend on its batch (vLLM's batch invariance),
    which switching to torch's blocked GEMM past some row count would break. The price is prefill-sized
    products about 1.5x slower than torch's GEMM (scripts/bench_cpu_experts.py --linear)."""
    half = weight_dtype in (torch.bfloat16, torch.float16)
    if kernel_ok and weight_dtype in cpu_kernels.WEIGHT_CODES:
        return "kernel"
    return "upcast" if half else "torch"


def cpu_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for fp32 rows on CPU over a weight kept fp32, bf16 or fp16; fp32 out and accumulation.

    Any leading dims. Half weights widen exactly, so only the summation order differs from
    ``F.linear(x, w.float())``, which is the fallback wherever the kernel is absent or does not pay.
    Other devices and dtypes: plain ``F.linear`` (over ``w`` in x's dtype).
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or not w.is_contiguous():
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))
    path = choose_linear_path(w.dtype, cpu_kernels.available())
    if path == "kernel":
        if x.dim() == 2:  # the model's decode rows: no reshape and no view (each a microsecond per call)
            return cpu_kernels.linear(x if x.stride(1) == 1 else x.contiguous(), w)
        return cpu_kernels.linear(_rows_2d(x), w).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w if path == "torch" else w.to(x.dtype))


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    """``x`` as [rows, last dim] with unit column stride (a view where possible), for the C kernels."""
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


# Rows per fused SwiGLU call: its hidden [rows, I] stays in cache, and a prefill splits into calls whose rows get
# the bits they would get alone (each row's sums run in one order whatever the call's row count).
SWIGLU_ROWS_PER_CALL = 64


def cpu_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``w2 @ (silu(w1 @ x) * (w3 @ x))`` for fp32 rows on CPU (dense MLPs, shared experts): the fused kernel,
    :data:`SWIGLU_ROWS_PER_CALL` rows a call, where the kernels apply, else three :func:`cpu_linear` and
    torch's silu."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (x.device.type == "cpu" and x.dtype == torch.float32 and rows
            and all(w.is_contiguous() and w.dtype == w1.dtype for w in (w1, w3, w2))
            and choose_linear_path(w1.dtype, cpu_kernels.available()) == "kernel"):
        flat = _rows_2d(x)
        if rows <= SWIGLU_ROWS_PER_CALL:
            y = cpu_kernels.swiglu(flat, w1, w3, w2)
        else:
            y = torch.cat([cpu_kernels.swiglu(part, w1, w3, w2) for part in flat.split(SWIGLU_ROWS_PER_CALL)])
        return y if x.dim() == 2 else y.view(*x.shape[:-1], w2.shape[0])
    return cpu_linear(F.silu(cpu_linear(x, w1)) * cpu_linear(x, w3), w2)


def cpu_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of fp32 rows on CPU in one kernel call, any row count (a row's bits never depend on its batch);
    None where the kernel does not apply (other devices or dtypes, no kernels): the caller runs its torch ops."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or not rows
            or not weight.is_contiguous() or not cpu_kernels.available()):
        return None
    y = cpu_kernels.rmsnorm(_rows_2d(x), weight, eps)
    return y if x.dim() == 2 else y.view(x.shape)


def cpu_mla_decode(q_nope, q_pe, wkv_b, latent, block_tables, context_lens, block_size: int, softmax_scale: float,
                   max_context_len: int) -> torch.Tensor | None:
    """The absorbed MLA decode of fp32 queries over an fp32 latent cache on CPU in one kernel call
    ([B, H, V]); None where it does not apply (the caller runs its einsums and the decode op)."""
    if (q_nope.device.type != "cpu" or not cpu_kernels.available()
            or any(t.dtype != torch.float32 for t in (q_nope, q_pe, wkv_b, latent)) or latent.stride(-1) != 1
            or block_tables.dtype != torch.int64 or context_lens.dtype != torch.int64):
        return None
    return cpu_kernels.mla_decode(q_nope.contiguous(), q_pe.contiguous(), wkv_b.contiguous(), latent,
                                  block_tables.contiguous(), context_lens.contiguous(), block_size, softmax_scale,
                                  max_context_len)


def cpu_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor | None:
    """Rotary.apply of fp32 [T, R] / [T, H, R] on CPU in one kernel call, bit-equal to its torch ops; None where
    the kernel does not apply (the caller runs them)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() not in (2, 3) or x.stride(-1) != 1
            or cos.dtype != torch.float32 or not cos.is_contiguous() or not sin.is_contiguous()
            or x.shape[0] > KERNEL_MAX_ROWS_HALF or not cpu_kernels.available()):
        return None
    return cpu_kernels.rope(x, cos, sin, interleave)


def cpu_store_latent(kv_cache: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    """The latent cache store on CPU: one kernel call (a copy per row: the same bits) where the tensors are the
    kernel's (fp32 rows, int64 slots), else kernels/cache_store.py's ``store_latent_ref``, which also checks."""
    if (kv_cache.device.type == "cpu" and kv_cache.dtype == torch.float32 and c_kv.dtype == torch.float32
            and k_pe.dtype == torch.float32 and slot_mapping.dtype == torch.int64 and slot_mapping.dim() == 1
            and slot_mapping.is_contiguous() and kv_cache.dim() == 2 and kv_cache.stride(-1) == 1
            and c_kv.dim() == 2 and k_pe.dim() == 2 and c_kv.stride(-1) == 1 and k_pe.stride(-1) == 1
            and cpu_kernels.available()):
        _check_inputs(kv_cache, c_kv, k_pe, slot_mapping)  # the reference's errors, word for word
        cpu_kernels.store_latent(kv_cache, c_kv, k_pe, slot_mapping)
        return
    store_latent_ref(kv_cache, c_kv, k_pe, slot_mapping)
