"""Write new tokens' latent rows into the paged MLA cache: Triton kernel, plain-torch reference, selector.

Symbols: T tokens, C kv_lora_rank (latent), R qk_rope_head_dim.

    kv_cache[slot_mapping[t]] = [c_kv[t] | k_pe[t]]     (cast to the cache dtype, in place)

A negative slot marks a padding token and is skipped. Slots must be distinct (which duplicate wins is
unspecified) and below kv_cache.shape[0]; the kernel ignores larger ones to stay in bounds.

The launch is the torch custom op ``moemesh::store_latent`` (mutates kv_cache; a fake impl lets it run
under FakeTensorMode, see kernels/library.py). The Triton path never reads device data on the host; the
reference selects the kept rows with a boolean mask (a data-dependent shape), fine on the CPU it serves.
"""

from __future__ import annotations

from typing import Callable

import torch

from .choose import use_triton
from .library import expect, expect_one_device, op_name

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs only torch
    triton = None

HAS_TRITON = triton is not None
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_BLOCK_T = 16  # tokens per program

StoreLatentFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


if HAS_TRITON:

    @triton.jit
    def store_latent_kernel(
        kv_ptr,  # [slots, C + R]
        c_kv_ptr,  # [T, C]
        k_pe_ptr,  # [T, R]
        slot_ptr,  # [T]
        T,
        num_slots,
        C,
        R,
        stride_kv,
        stride_c,
        stride_r,
        BLOCK_T: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        slot = tl.load(slot_ptr + tok, mask=tok < T, other=-1).to(tl.int64)
        row_mask = (tok < T) & (slot >= 0) & (slot < num_slots)  # [BLOCK_T]
        rows = kv_ptr + slot * stride_kv
        tok64 = tok.to(tl.int64)
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_R)
        c_mask = row_mask[:, None] & (offs_c < C)[None, :]
        r_mask = row_mask[:, None] & (offs_r < R)[None, :]
        # Through fp32: exact for every source dtype, and the CPU interpreter mishandles bf16 otherwise.
        c_kv = tl.load(c_kv_ptr + tok64[:, None] * stride_c + offs_c[None, :], mask=c_mask).to(tl.float32)
        k_pe = tl.load(k_pe_ptr + tok64[:, None] * stride_r + offs_r[None, :], mask=r_mask).to(tl.float32)
        out_ty = kv_ptr.dtype.element_ty
        tl.store(rows[:, None] + offs_c[None, :], c_kv.to(out_ty), mask=c_mask)
        tl.store(rows[:, None] + C + offs_r[None, :], k_pe.to(out_ty), mask=r_mask)


def _check_inputs(kv_cache, c_kv, k_pe, slot_mapping) -> None:
    """Shapes, dtypes and devices; raises ValueError/TypeError that say what is expected."""
    named = {"kv_cache": kv_cache, "c_kv": c_kv, "k_pe": k_pe, "slot_mapping": slot_mapping}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"store_latent: {name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {t.device for t in named.values()}
    if len(devices) != 1:
        raise ValueError(f"store_latent: all tensors must be on one device, got {sorted(map(str, devices))}")
    if c_kv.dim() != 2 or k_pe.dim() != 2 or slot_mapping.dim() != 1:
        raise ValueError(
            f"store_latent: c_kv must be [T, C], k_pe [T, R], slot_mapping [T]; "
            f"got {tuple(c_kv.shape)}, {tuple(k_pe.shape)}, {tuple(slot_mapping.shape)}"
        )
    if not c_kv.shape[0] == k_pe.shape[0] == slot_mapping.shape[0]:
        raise ValueError(
            f"store_latent: c_kv, k_pe and slot_mapping must have the same T, "
            f"got {c_kv.shape[0]}, {k_pe.shape[0]}, {slot_mapping.shape[0]}"
        )
    width = c_kv.shape[1] + k_pe.shape[1]
    if kv_cache.dim() != 2 or kv_cache.shape[1] != width:
        raise ValueError(
            f"store_latent: kv_cache must be [slots, C + R] = [slots, {width}], got {tuple(kv_cache.shape)}"
        )
    for name in ("kv_cache", "c_kv", "k_pe"):
        if named[name].dtype not in _FLOAT_DTYPES:
            raise TypeError(f"store_latent: {name} must be float32/float16/bfloat16, got {named[name].dtype}")
    if slot_mapping.dtype not in _INDEX_DTYPES:
        raise TypeError(f"store_latent: slot_mapping must be int32 or int64, got {slot_mapping.dtype}")


@torch.library.custom_op(op_name("store_latent"), mutates_args=("kv_cache",))
def store_latent_launch(
    kv_cache: torch.Tensor,  # [slots, C + R], stride 1 along C + R; written
    c_kv: torch.Tensor,  # [T, C], stride 1 along C
    k_pe: torch.Tensor,  # [T, R], stride 1 along R
    slot_mapping: torch.Tensor,  # [T], contiguous
) -> None:
    """The store kernel (a custom op, see kernels/library.py): BLOCK_T tokens per program."""
    T, C = c_kv.shape
    R = k_pe.shape[1]
    store_latent_kernel[(triton.cdiv(T, _BLOCK_T),)](
        kv_cache, c_kv, k_pe, slot_mapping,
        T, kv_cache.shape[0], C, R, kv_cache.stride(0), c_kv.stride(0), k_pe.stride(0),
        BLOCK_T=_BLOCK_T,
        BLOCK_C=triton.next_power_of_2(C),
        BLOCK_R=triton.next_power_of_2(max(R, 1)),
    )  # fmt: skip


@store_latent_launch.register_fake
def _(kv_cache, c_kv, k_pe, slot_mapping):
    op = "store_latent"
    expect_one_device(op, kv_cache=kv_cache, c_kv=c_kv, k_pe=k_pe, slot_mapping=slot_mapping)
    expect(c_kv.dim() == 2 and k_pe.dim() == 2 and slot_mapping.dim() == 1, op, "c_kv [T, C], k_pe [T, R], slots [T]")
    expect(c_kv.shape[0] == k_pe.shape[0] == slot_mapping.shape[0], op, "c_kv, k_pe and slot_mapping: one T")
    expect(kv_cache.dim() == 2 and kv_cache.shape[1] == c_kv.shape[1] + k_pe.shape[1], op, "kv_cache [slots, C + R]")
    expect(all(t.dtype in _FLOAT_DTYPES for t in (kv_cache, c_kv, k_pe)), op, "float32/float16/bfloat16 rows")
    expect(slot_mapping.dtype in _INDEX_DTYPES, op, "slot_mapping must be int32 or int64")


def store_latent(
    kv_cache: torch.Tensor,  # [slots, C + R], written in place
    c_kv: torch.Tensor,  # [T, C]
    k_pe: torch.Tensor,  # [T, R]
    slot_mapping: torch.Tensor,  # [T] int32/int64, negative = skip
) -> None:
    """Triton: scatter T latent rows into the cache (cast to its dtype); checks shapes only (no host sync)."""
    if not HAS_TRITON:
        raise RuntimeError("store_latent: triton is not installed; use store_latent_ref or select_store_latent(device)")
    _check_inputs(kv_cache, c_kv, k_pe, slot_mapping)
    if kv_cache.stride(1) != 1:
        raise ValueError("store_latent: kv_cache rows must be contiguous (stride 1 along C + R)")
    if c_kv.shape[0] == 0:
        return
    c_kv = c_kv if c_kv.stride(1) == 1 else c_kv.contiguous()
    k_pe = k_pe if k_pe.stride(1) == 1 else k_pe.contiguous()
    store_latent_launch(kv_cache, c_kv, k_pe, slot_mapping.contiguous())


def store_latent_ref(
    kv_cache: torch.Tensor,  # [slots, C + R], written in place
    c_kv: torch.Tensor,  # [T, C]
    k_pe: torch.Tensor,  # [T, R]
    slot_mapping: torch.Tensor,  # [T], negative = skip
) -> None:
    """Plain torch: index_put of the concatenated rows; skips negative slots (a boolean mask: the CPU path)."""
    _check_inputs(kv_cache, c_kv, k_pe, slot_mapping)
    keep = slot_mapping >= 0
    rows = torch.cat([c_kv, k_pe], dim=-1).to(kv_cache.dtype)  # [T, C + R]
    kv_cache[slot_mapping[keep].long()] = rows[keep]


def select_store_latent(device: torch.device | str, force_triton: bool = False) -> StoreLatentFn:
    """Choose once, at construction (the rule: :func:`kernels.choose.use_triton`)."""
    return store_latent if use_triton(device, force_triton, "select_store_latent") else store_latent_ref


def store_latent_op(kv_cache: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Per-call dispatch by kv_cache's device (Triton on CUDA, reference elsewhere); prefer select_store_latent once."""
    select_store_latent(kv_cache.device)(kv_cache, c_kv, k_pe, slot_mapping)
