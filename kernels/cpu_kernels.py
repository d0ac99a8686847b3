"""The CPU kernels (cpu_gemv.c, cpu_moe.c, cpu_amx.c, cpu_decode_ops.c, cpu_mla_layer.c, cpu_fp8.c, cpu_simd.h):
built once per machine with the C compiler, cached, loaded by ctypes.

No torch headers and no ninja: ``cc -O3 -march=native -fopenmp -shared`` compiles the C files into one
library in about a second. The library is cached under ``$MOEMESH_KERNEL_CACHE`` (default ``~/.cache/moemesh/cpu-kernels``),
keyed by the source, the flags, the compiler's version and this CPU's feature flags, so a machine builds it
once and a different CPU never loads a library built for another. When there is no compiler, or the build
fails, :func:`load` logs one line saying so and returns None; callers then take plain torch (always correct,
slower). ``MOEMESH_CPU_KERNELS=0`` turns the kernels off (the same fallback, for comparisons);
``MOEMESH_CPU_AMX=0`` only the AMX path (cpu_amx.c).

The functions here take torch tensors, check what the C side assumes (dtypes, contiguity, shapes, CPU) and
pass raw pointers; the arithmetic is the C file's (fp32 activations and accumulation, weights widened from
their stored dtype in registers).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from pathlib import Path
from typing import NamedTuple

import torch

from moemesh.logs import get_logger
from moemesh.native.build import compile_library, compiler_version, find_compiler, library_path

log = get_logger("moemesh.kernels.cpu")

SOURCE = Path(__file__).with_name("cpu_gemv.c")
# Compiled with SOURCE into the one library; the header is theirs. All of them key the cache, so an edit to
# any builds anew.
OTHER_SOURCES = tuple(Path(__file__).with_name(f)
                      for f in ("cpu_moe.c", "cpu_amx.c", "cpu_decode_ops.c", "cpu_mla_layer.c", "cpu_fp8.c"))
HEADERS = (Path(__file__).with_name("cpu_simd.h"),)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
FALLBACK_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11")  # a compiler without -march=native
WEIGHT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ABI_VERSION = 9

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded library or None once tried


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _build() -> ctypes.CDLL | None:
    if os.environ.get("MOEMESH_CPU_KERNELS", "1") == "0":
        log.warning("cpu_kernels_off", reason="MOEMESH_CPU_KERNELS=0", fallback="plain torch (correct, slower)")
        return None
    cc = find_compiler()
    if cc is None:
        log.warning("cpu_kernels_unavailable", reason="no C compiler (cc, gcc or clang) on PATH",
                    fallback="plain torch (correct, slower): install gcc to build the CPU expert kernels")
        return None
    version = compiler_version(cc)
    errors = []
    for flags in (FLAGS, FALLBACK_FLAGS):
        sources = (SOURCE, *OTHER_SOURCES)
        path = library_path("cpu_gemv", (*sources, *HEADERS), flags, version, _cpu_flags())  # -march=native: CPU flags
        if not path.exists():
            err = compile_library(cc, flags, sources, path, timeout_s=300)
            if err is not None:
                errors.append(err)
                continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            errors.append(str(e))
            continue
        if lib.mm_abi_version() != ABI_VERSION:
            errors.append(f"{path}: ABI {lib.mm_abi_version()}, expected {ABI_VERSION}")
            continue
        _declare(lib)
        log.debug("cpu_kernels_loaded", path=str(path), flags=" ".join(flags))
        return lib
    log.warning("cpu_kernels_unavailable", reason=f"{cc} could not build {SOURCE.name}: {errors[-1]}",
                fallback="plain torch (correct, slower)")
    return None


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.mm_linear.argtypes = [p, i64, i64, p, i32, i64, i64, p, i32]
    lib.mm_linear.restype = None
    lib.mm_moe_swiglu.argtypes = [p, p, i64, p, p, i32, i64, i64, p, p, i32]
    lib.mm_moe_swiglu.restype = i32
    lib.mm_moe_swiglu_amx.argtypes = [p, p, i64, i64, p, p, i64, i64, p, i32]
    lib.mm_moe_swiglu_amx.restype = i32
    lib.mm_amx_ready.argtypes = []
    lib.mm_amx_ready.restype = i32
    lib.mm_amx_layers_run.argtypes = []
    lib.mm_amx_layers_run.restype = i64
    lib.mm_swiglu.argtypes = [p, i64, i64, p, p, p, i32, i64, i64, p, p, i32]
    lib.mm_swiglu.restype = None
    lib.mm_moe_forward.argtypes = [p, i64, i64, p, p, i64, p, i64, i64, p, p, i32, i64, i64, i64, p, i32]
    lib.mm_moe_forward.restype = i32
    lib.mm_moe_forward_fp8.argtypes = [p, i64, i64, p, p, i64, p, i64, i64, p, p, p, p, i64, i64, i64, i64, p, i32]
    lib.mm_moe_forward_fp8.restype = i32
    lib.mm_dequant_fp8.argtypes = [p, p, i64, i64, i64, i64, p]
    lib.mm_dequant_fp8.restype = None
    lib.mm_rmsnorm.argtypes = [p, i64, i64, i64, p, ctypes.c_float, p, i64]
    lib.mm_rmsnorm.restype = None
    lib.mm_mla_decode.argtypes = [p, p, p, p, i64, p, i64, p, i64, i64, i64, i64, i64, i64, i64, i64,
                                  ctypes.c_float, p, i32]
    lib.mm_mla_decode.restype = None
    lib.mm_rope.argtypes = [p, i64, i64, i64, i64, i64, i32, p, p, p]
    lib.mm_rope.restype = None
    lib.mm_store_latent.argtypes = [p, i64, i64, p, i64, p, i64, p, i64, i64, i64]
    lib.mm_store_latent.restype = i64
    lib.mm_mla_layer.argtypes = [p, p, i32]  # (mm_mla_weights *, mm_mla_step *, threads): kernels/cpu_mla_layer.py
    lib.mm_mla_layer.restype = i64


_UNSET = object()
_CPU = torch.device("cpu")  # host memory for C whatever the default device; an object, not a string to parse


def load() -> ctypes.CDLL | None:
    """The kernel library, built on first use (once per process); None when it cannot be had (logged once)."""
    lib = _state.get("lib", _UNSET)  # the hot path (every call of every kernel): no lock once it is decided
    if lib is not _UNSET:
        return lib  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _build()
        return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    return load() is not None


def resolve_weights_dtype(name: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    """``moemesh.devices.resolve_dtype`` told whether the CPU kernels are here (built on first call, on CPU only)."""
    from moemesh.devices import resolve_dtype

    return resolve_dtype(name, checkpoint_dtype, device, cpu_kernels=device.type != "cpu" or available())


def _check_weight(name: str, w: torch.Tensor, dims: int) -> int:
    if w.dtype not in WEIGHT_CODES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16 for the CPU kernel, got {w.dtype}")
    if w.device.type != "cpu" or not w.is_contiguous() or w.dim() != dims:
        raise ValueError(f"{name} must be a contiguous {dims}-d CPU tensor, got {list(w.shape)} on {w.device} "
                         f"(contiguous={w.is_contiguous()})")
    return WEIGHT_CODES[w.dtype]


def _check_x(name: str, x: torch.Tensor, k: int) -> None:
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"{name} must be a [M, {k}] float32 CPU tensor with unit column stride, got "
                         f"{list(x.shape)} {x.dtype} on {x.device}")


def linear(x: torch.Tensor, w: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """[M, K] fp32 x [N, K] (fp32|bf16|fp16) -> [M, N] fp32: ``F.linear(x, w.float())`` without the copy."""
    lib = load()
    if lib is None:
        raise RuntimeError("the CPU kernels are not built (see the cpu_kernels_unavailable log line)")
    code = _check_weight("w", w, 2)
    n, k = w.shape
    _check_x("x", x, k)
    y = torch.empty(x.shape[0], n, dtype=torch.float32, device=_CPU)  # host memory for C, whatever the default
    lib.mm_linear(x.data_ptr(), x.stride(0), x.shape[0], w.data_ptr(), code, n, k, y.data_ptr(),
                  threads or torch.get_num_threads())
    return y


def _check_experts(w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int, int]:
    """(weight dtype code, E_l, D, I) of an expert stack ``w13`` [E_l, 2I, D], ``w2`` [E_l, D, I]; else ValueError."""
    code = _check_weight("w13", w13, 3)
    if _check_weight("w2", w2, 3) != code:
        raise ValueError(f"w13 and w2 must share a dtype, got {w13.dtype} and {w2.dtype}")
    return (code, *expert_shapes(w13, w2))


def expert_shapes(w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int]:
    """(E_l, D, I) of ``w13`` [E_l, 2I, D] and ``w2`` [E_l, D, I] (3-d, any dtype); else ValueError."""
    n_slots, two_i, d = w13.shape
    inter = two_i // 2
    if two_i % 2 or tuple(w2.shape) != (n_slots, d, inter):
        raise ValueError(f"w13 {list(w13.shape)} and w2 {list(w2.shape)} are not [E, 2I, D] and [E, D, I]")
    return n_slots, d, inter


def check_routing(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, slot_of: torch.Tensor,
                  d: int) -> tuple[int, int]:
    """(T, K) of a layer's routed rows, as the moe_forward kernels read them; else ValueError."""
    t, k = check_rows(x, topk_idx, topk_weights, d)
    _check_slot_of(slot_of)
    return t, k


def _check_slot_of(slot_of: torch.Tensor) -> None:
    _check_table("slot_of", slot_of, torch.int64, (slot_of.shape[0],) if slot_of.dim() == 1 else (-1,))


def check_rows(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, d: int) -> tuple[int, int]:
    """(T, K) of the rows and their routing, as the moe_forward kernels read them; else ValueError."""
    _check_x("x", x, d)
    t, k = x.shape[0], topk_idx.shape[-1] if topk_idx.dim() == 2 else -1
    _check_table("topk_idx", topk_idx, torch.int64, (t, k))
    _check_table("topk_weights", topk_weights, torch.float32, (t, k))
    return t, k


def moe_swiglu(xs: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               threads: int | None = None) -> torch.Tensor:
    """Rows of every busy expert at once: ``xs`` [A, D] fp32 sorted by slot, ``offs`` [E_l + 1] int64 row
    offsets (slot s owns rows offs[s]:offs[s+1]), ``w13`` [E_l, 2I, D], ``w2`` [E_l, D, I] -> [A, D] fp32
    ``w2[s] @ (silu(gate[s] @ x) * (up[s] @ x))``."""
    lib = load()
    if lib is None:
        raise RuntimeError("the CPU kernels are not built (see the cpu_kernels_unavailable log line)")
    code, n_slots, d, inter = _check_experts(w13, w2)
    _check_sorted_rows(xs, offs, n_slots, d)
    h = torch.empty(xs.shape[0], inter, dtype=torch.float32, device=_CPU)
    ys = torch.empty(xs.shape[0], d, dtype=torch.float32, device=_CPU)
    _allocated(lib.mm_moe_swiglu(xs.data_ptr(), offs.data_ptr(), n_slots, w13.data_ptr(), w2.data_ptr(), code, d,
                                 inter, h.data_ptr(), ys.data_ptr(), threads or torch.get_num_threads()), xs.shape[0])
    return ys


def amx_ready() -> bool:
    """Whether the library has the AMX path (cpu_amx.c: built for a CPU with AMX-BF16) and this process may
    use the tiles (Linux grants the tile state per process on request); asked once. ``MOEMESH_CPU_AMX=0``
    says no (the AVX-512 kernels and torch then take every batch, for comparisons)."""
    ready = _state.get("amx")
    if ready is None:
        lib = load()
        with _lock:
            off = os.environ.get("MOEMESH_CPU_AMX", "1") == "0"
            ready = _state["amx"] = bool(lib is not None and not off and lib.mm_amx_ready() == 1)
            log.debug("cpu_amx", ready=ready, reason="MOEMESH_CPU_AMX=0" if off else None)
    return bool(ready)


def amx_layers_run() -> int:
    """Routed-expert layers this process has computed on AMX tiles (0 without the library): which path ran."""
    lib = load()
    return int(lib.mm_amx_layers_run()) if lib is not None else 0


def moe_swiglu_amx(xs: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   threads: int | None = None) -> torch.Tensor:
    """:func:`moe_swiglu` on AMX tiles (cpu_amx.c) for bf16 experts whose D and I are multiples of 32: fp32
    rows split into three exact bf16 terms, fp32 accumulation; for many rows per expert (prefill)."""
    if not amx_ready():
        raise RuntimeError("no AMX here: this CPU lacks AMX-BF16, the kernels were built without it, or the "
                           "kernel refused this process the tile state; use moe_swiglu")
    code, n_slots, d, inter = _check_experts(w13, w2)
    if code != WEIGHT_CODES[torch.bfloat16] or d % 32 or inter % 32:
        raise ValueError(f"the AMX path takes bf16 experts with D and I multiples of 32, got {w13.dtype}, "
                         f"D={d}, I={inter}")
    _check_sorted_rows(xs, offs, n_slots, d)
    ys = torch.empty(xs.shape[0], d, dtype=torch.float32, device=_CPU)
    rc = _lib().mm_moe_swiglu_amx(xs.data_ptr(), offs.data_ptr(), n_slots, 1, w13.data_ptr(), w2.data_ptr(), d,
                                  inter, ys.data_ptr(), threads or torch.get_num_threads())
    if rc != 0:
        raise RuntimeError("mm_moe_swiglu_amx refused the call (no AMX in this build or process)")
    return ys


def _check_sorted_rows(xs: torch.Tensor, offs: torch.Tensor, n_slots: int, d: int) -> None:
    _check_x("xs", xs, d)
    if not xs.is_contiguous():
        raise ValueError("xs must be contiguous")
    if offs.dtype != torch.int64 or offs.shape != (n_slots + 1,) or not offs.is_contiguous():
        raise ValueError(f"offs must be [{n_slots + 1}] int64, got {list(offs.shape)} {offs.dtype}")
    if int(offs[0]) != 0 or int(offs[-1]) != xs.shape[0] or bool((offs[1:] < offs[:-1]).any()):
        raise ValueError(f"offs must rise from 0 to {xs.shape[0]} (the rows of xs)")


def _allocated(rc: int, rows: int) -> None:
    """A routed-expert call's return code: MemoryError when the C side could not allocate its buffers."""
    if rc != 0:
        raise MemoryError(f"the CPU expert kernel could not allocate its buffers for {rows} rows; send fewer rows "
                          "per call (a smaller --max-batched-tokens) or give the node more memory")


def _lib() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError("the CPU kernels are not built (see the cpu_kernels_unavailable log line)")
    return lib


def _check_table(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be a contiguous {list(shape)} {dtype} CPU tensor, got {list(t.shape)} "
                         f"{t.dtype} on {t.device} (contiguous={t.is_contiguous()})")


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
           threads: int | None = None) -> torch.Tensor:
    """[M, D] fp32 -> [M, D] fp32 ``w2 @ (silu(w1 @ x) * (w3 @ x))`` in one call; ``w1``/``w3`` [I, D], ``w2``
    [D, I], one dtype (fp32, bf16 or fp16, widened in registers)."""
    lib = _lib()
    code = _check_weight("w1", w1, 2)
    inter, d = w1.shape
    if _check_weight("w3", w3, 2) != code or _check_weight("w2", w2, 2) != code:
        raise ValueError(f"w1, w3 and w2 must share a dtype, got {w1.dtype}, {w3.dtype} and {w2.dtype}")
    if tuple(w3.shape) != (inter, d) or tuple(w2.shape) != (d, inter):
        raise ValueError(f"w1 {list(w1.shape)}, w3 {list(w3.shape)}, w2 {list(w2.shape)} are not [I, D], [I, D], "
                         "[D, I]")
    _check_x("x", x, d)
    h = torch.empty(x.shape[0], inter, dtype=torch.float32, device=_CPU)
    y = torch.empty(x.shape[0], d, dtype=torch.float32, device=_CPU)
    lib.mm_swiglu(x.data_ptr(), x.stride(0), x.shape[0], w1.data_ptr(), w3.data_ptr(), w2.data_ptr(), code, d,
                  inter, h.data_ptr(), y.data_ptr(), threads or torch.get_num_threads())
    return y


class ExpertTables(NamedTuple):
    """An expert stack and its slot table, checked once, as :func:`moe_forward_tables` passes them to C: a
    shard's layer snapshot never changes its tensors, so its layers need not check them on every call."""

    code: int  # the weights' dtype (WEIGHT_CODES)
    n_slots: int
    d: int
    inter: int
    w13: int  # addresses
    w2: int
    slot_of: int
    n_experts: int
    tensors: tuple  # (slot_of, w13, w2): kept alive while their addresses are in use


def expert_tables(slot_of: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> ExpertTables:
    """``slot_of`` [E] int64 (logical id -> local slot, -1 when not hosted), ``w13`` [E_l, 2I, D], ``w2`` [E_l, D, I]
    checked for :func:`moe_forward_tables`; ValueError when they are not the kernel's."""
    code, n_slots, d, inter = _check_experts(w13, w2)
    _check_slot_of(slot_of)
    return ExpertTables(code, n_slots, d, inter, w13.data_ptr(), w2.data_ptr(), slot_of.data_ptr(), slot_of.shape[0],
                        (slot_of, w13, w2))


def moe_forward(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, slot_of: torch.Tensor,
                w13: torch.Tensor, w2: torch.Tensor, threads: int | None = None,
                amx_min_rows: int = 0) -> torch.Tensor:
    """A routed-expert layer in one call: ``x`` [T, D] fp32, ``topk_idx`` [T, K] int64 logical ids (-1, or
    one ``slot_of`` [E] int64 maps to -1: not computed here), ``topk_weights`` [T, K] fp32, ``w13``
    [E_l, 2I, D], ``w2`` [E_l, D, I] -> [T, D] fp32: per row, the weighted sum over its hosted experts (in
    ascending slot order, as the shard's sorted torch path adds them). The routing bookkeeping (slots, sort,
    gather, weighting, scatter) runs in C with the math. ``amx_min_rows`` > 0: bf16 experts with that many rows
    or more run on AMX tiles (:func:`moe_swiglu_amx`) where AMX can run here, the others as ever; 0: never."""
    return moe_forward_tables(x, topk_idx, topk_weights, expert_tables(slot_of, w13, w2), threads, amx_min_rows)


def moe_forward_tables(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, tables: ExpertTables,
                       threads: int | None = None, amx_min_rows: int = 0) -> torch.Tensor:
    """:func:`moe_forward` over experts checked once (:func:`expert_tables`): only the rows are checked here."""
    lib = _lib()
    t, k = check_rows(x, topk_idx, topk_weights, tables.d)
    if amx_min_rows < 0:
        raise ValueError(f"amx_min_rows must be >= 0 (0: never AMX), got {amx_min_rows}")
    out = torch.empty(t, tables.d, dtype=torch.float32, device=_CPU)
    if amx_min_rows and not amx_ready():  # MOEMESH_CPU_AMX=0, or no AMX here: the C call would not ask again
        amx_min_rows = 0
    _allocated(lib.mm_moe_forward(x.data_ptr(), x.stride(0), t, topk_idx.data_ptr(), topk_weights.data_ptr(), k,
                                  tables.slot_of, tables.n_experts, tables.n_slots, tables.w13, tables.w2, tables.code,
                                  tables.d, tables.inter, amx_min_rows, out.data_ptr(),
                                  threads or torch.get_num_threads()), t)
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[M, D] fp32 rows (unit column stride) -> ``weight * x / sqrt(mean(x^2) + eps)``, fp32, one call."""
    lib = _lib()
    d = weight.shape[0] if weight.dim() == 1 else -1
    _check_table("weight", weight, torch.float32, (d,))
    _check_x("x", x, d)
    y = torch.empty(x.shape[0], d, dtype=torch.float32, device=_CPU)
    lib.mm_rmsnorm(x.data_ptr(), x.stride(0), x.shape[0], d, weight.data_ptr(), eps, y.data_ptr(), d)
    return y


def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, wkv_b: torch.Tensor, cache: torch.Tensor,
               block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, softmax_scale: float,
               max_context_len: int, threads: int | None = None) -> torch.Tensor:
    """Absorbed MLA decode in one call, both absorptions included: ``q_nope`` [B, H, N], ``q_pe`` [B, H, R],
    ``wkv_b`` [H, N + V, C] fp32; ``cache`` [slots, >= C + R] fp32 rows (unit column stride; [c_kv | k_pe]
    first); ``block_tables`` [B, max_blocks] and ``context_lens`` [B] int64 -> [B, H, V] fp32. Positions
    past ``min(context_lens[b], max_context_len)`` are not attended; an empty context gives zeros."""
    lib = _lib()
    B, H, N = q_nope.shape
    R = q_pe.shape[-1]
    if wkv_b.dim() != 3 or wkv_b.shape[0] != H or wkv_b.shape[1] <= N:
        raise ValueError(f"wkv_b must be [H={H}, N + V, C], got {list(wkv_b.shape)}")
    V, C = wkv_b.shape[1] - N, wkv_b.shape[2]
    _check_table("q_nope", q_nope, torch.float32, (B, H, N))
    _check_table("q_pe", q_pe, torch.float32, (B, H, R))
    _check_table("wkv_b", wkv_b, torch.float32, (H, N + V, C))
    if cache.dtype != torch.float32 or cache.device.type != "cpu" or cache.dim() != 2 or cache.stride(1) != 1 \
            or cache.shape[1] < C + R:
        raise ValueError(f"cache must be [slots, >= {C + R}] float32 CPU rows with unit column stride, got "
                         f"{list(cache.shape)} {cache.dtype} on {cache.device}")
    _check_table("block_tables", block_tables, torch.int64, (B, block_tables.shape[-1]))
    _check_table("context_lens", context_lens, torch.int64, (B,))
    out = torch.empty(B, H, V, dtype=torch.float32, device=_CPU)
    lib.mm_mla_decode(q_nope.data_ptr(), q_pe.data_ptr(), wkv_b.data_ptr(), cache.data_ptr(), cache.stride(0),
                      block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(), block_size, B, H, N,
                      R, C, V, max_context_len, softmax_scale, out.data_ptr(), threads or torch.get_num_threads())
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """RoPE of ``x`` [T, R] or [T, H, R] fp32 (any row and head strides, unit element stride) with ``cos``/``sin``
    [T, R/2] fp32 -> a new contiguous tensor of x's shape, halves laid out [x1', x2'] (Rotary.apply's)."""
    lib = _lib()
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() not in (2, 3) or x.stride(-1) != 1 \
            or x.shape[-1] % 2:
        raise ValueError(f"x must be a [T, R] or [T, H, R] float32 CPU tensor (R even, unit element stride), got "
                         f"{list(x.shape)} {x.dtype} on {x.device}")
    T, R = x.shape[0], x.shape[-1]
    _check_table("cos", cos, torch.float32, (T, R // 2))
    _check_table("sin", sin, torch.float32, (T, R // 2))
    heads, sh = (x.shape[1], x.stride(1)) if x.dim() == 3 else (1, 0)
    out = torch.empty(x.shape, dtype=torch.float32, device=_CPU)
    lib.mm_rope(x.data_ptr(), x.stride(0), sh, T, heads, R, int(interleave), cos.data_ptr(), sin.data_ptr(),
                out.data_ptr())
    return out


def store_latent(cache: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """``cache[slot_mapping[t]] = [c_kv[t] | k_pe[t]]`` in place, negative slots skipped: ``cache`` [slots, C + R]
    fp32 rows (any row stride, unit column stride), ``c_kv`` [T, C] and ``k_pe`` [T, R] fp32 rows, ``slot_mapping``
    [T] int64. A slot past the cache raises IndexError (the rows before it are stored, as torch's would not be:
    the caller's error either way)."""
    lib = _lib()
    T, C = c_kv.shape
    R = k_pe.shape[1]
    for name, t, width in (("cache", cache, C + R), ("c_kv", c_kv, C), ("k_pe", k_pe, R)):
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2 or t.shape[1] != width \
                or t.stride(1) != 1:
            raise ValueError(f"{name} must be [rows, {width}] float32 CPU rows with unit column stride, got "
                             f"{list(t.shape)} {t.dtype} on {t.device}")
    if k_pe.shape[0] != T:
        raise ValueError(f"c_kv and k_pe must have the same rows, got {T} and {k_pe.shape[0]}")
    _check_table("slot_mapping", slot_mapping, torch.int64, (T,))
    bad = lib.mm_store_latent(cache.data_ptr(), cache.stride(0), cache.shape[0], c_kv.data_ptr(), c_kv.stride(0),
                              k_pe.data_ptr(), k_pe.stride(0), slot_mapping.data_ptr(), T, C, R)
    if bad >= 0:
        raise IndexError(f"slot_mapping[{bad}] = {int(slot_mapping[bad])} is past the cache's {cache.shape[0]} slots")


def mla_layer(weights, step, threads: int) -> int:
    """``mm_mla_layer`` on prepared structs (kernels/cpu_mla_layer.py builds and checks them): -1 when done,
    else the C function's error code."""
    return _lib().mm_mla_layer(weights, step, threads)
