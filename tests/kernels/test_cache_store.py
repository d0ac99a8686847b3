"""store_latent: the Triton scatter into the paged latent cache against the plain-torch reference."""

from __future__ import annotations

import os

# Triton picks interpreted-or-compiled when a kernel module is imported: set this first.
# TRITON_INTERPRET=0 in the environment runs the compiled kernels on CUDA instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from .kernel_utils import interpreting, kernel_device, load_kernel_module  # noqa: E402

store = load_kernel_module("moemesh.kernels.cache_store")
mla = load_kernel_module("moemesh.kernels.mla_decode")


def make_case(T, C, R, slots, src_dtype, cache_dtype, *, pad=0, index_dtype=torch.int64, seed=0):
    """T tokens to distinct random slots; the last `pad` tokens are padding (slot -1)."""
    gen = torch.Generator().manual_seed(seed)
    kv_cache = torch.randn(slots, C + R, generator=gen).to(cache_dtype)
    slot_mapping = torch.randperm(slots, generator=gen)[:T]
    if pad:
        slot_mapping[-pad:] = -1
    c_kv = torch.randn(T, C, generator=gen).to(src_dtype)
    k_pe = torch.randn(T, R, generator=gen).to(src_dtype)
    return kv_cache, c_kv, k_pe, slot_mapping.to(index_dtype)


@pytest.mark.parametrize(
    "T, C, R, slots, src_dtype, cache_dtype, pad, index_dtype",
    [
        (1, 32, 16, 9, torch.float32, torch.float32, 0, torch.int64),  # one token
        (21, 64, 8, 40, torch.float16, torch.float16, 3, torch.int32),  # T not a multiple of BLOCK_T; padding
        (16, 32, 16, 17, torch.bfloat16, torch.bfloat16, 0, torch.int64),  # bf16 passes through unchanged
        (7, 48, 16, 12, torch.float32, torch.float16, 1, torch.int32),  # C not a power of two; cast on store
        (5, 32, 16, 8, torch.float32, torch.bfloat16, 0, torch.int64),  # fp32 -> bf16 rounding
    ],
)
def test_kernel_matches_ref(T, C, R, slots, src_dtype, cache_dtype, pad, index_dtype):
    kv_cache, c_kv, k_pe, slot_mapping = make_case(
        T, C, R, slots, src_dtype, cache_dtype, pad=pad, index_dtype=index_dtype
    )
    expected = kv_cache.clone()
    store.store_latent_ref(expected, c_kv, k_pe, slot_mapping)
    device = kernel_device()
    got = kv_cache.to(device)
    store.store_latent(got, c_kv.to(device), k_pe.to(device), slot_mapping.to(device))
    if interpreting() and (src_dtype, cache_dtype) == (torch.float32, torch.bfloat16):
        # The interpreter truncates fp32 -> bf16 (a GPU rounds to nearest even): allow one bf16 ulp.
        torch.testing.assert_close(got.cpu(), expected, atol=0.0, rtol=2**-7)
    else:
        assert torch.equal(got.cpu(), expected)  # a copy with one rounding: bit-exact


def test_ref_writes_rows_and_skips_padding():
    kv_cache = torch.zeros(4, 3)
    store.store_latent_ref(kv_cache, torch.ones(2, 2), torch.full((2, 1), 2.0), torch.tensor([2, -1]))
    assert kv_cache.tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 2], [0, 0, 0]]


def test_strided_sources_into_a_cache_slice():
    """c_kv and k_pe as column slices of one [T, C + R] projection, as the model produces them."""
    device = kernel_device()
    kv = torch.randn(10, 48)
    kv_cache = torch.zeros(12, 48)
    slot_mapping = torch.arange(10) + 1
    expected = kv_cache.clone()
    store.store_latent_ref(expected, kv[:, :32], kv[:, 32:], slot_mapping)
    got = kv_cache.to(device)
    kv = kv.to(device)
    store.store_latent(got, kv[:, :32], kv[:, 32:], slot_mapping.to(device))
    assert torch.equal(got.cpu(), expected)


def test_store_then_decode():
    """Write a prompt's rows through store_latent, then attend over them with mla_decode."""
    device = kernel_device()
    C, R, bs, n = 32, 16, 4, 10
    gen = torch.Generator().manual_seed(1)
    kv_cache = torch.zeros(4 * bs + 1, C + R, device=device)
    table = torch.tensor([[2, 0, 3]], device=device)
    pos = torch.arange(n, device=device)
    slot_mapping = table[0, pos // bs] * bs + pos % bs
    c_kv, k_pe = torch.randn(n, C, generator=gen).to(device), torch.randn(n, R, generator=gen).to(device)
    store.store_latent(kv_cache, c_kv, k_pe, slot_mapping)
    q_c, q_pe = torch.randn(1, 3, C, generator=gen).to(device), torch.randn(1, 3, R, generator=gen).to(device)
    args = (q_c, q_pe, kv_cache, table, torch.tensor([n], device=device), bs, 0.2)
    got = mla.mla_decode(*args, num_splits=2, block_n=16)
    p = torch.softmax((q_c[0] @ c_kv.T + q_pe[0] @ k_pe.T) * 0.2, dim=-1)  # [H, n]
    torch.testing.assert_close(got[0], p @ c_kv, atol=2e-5, rtol=2e-5)


def _args(cache_width=4, c_shape=(2, 2), t_pe=2, slot_dtype=torch.long, cache_dtype=torch.float32):
    kv_cache = torch.zeros(4, cache_width, dtype=cache_dtype)
    return kv_cache, torch.zeros(*c_shape), torch.zeros(t_pe, 2), torch.zeros(2, dtype=slot_dtype)


@pytest.mark.parametrize(
    "args, error, match",
    [
        (_args(cache_width=5), ValueError, "C \\+ R"),
        (_args(t_pe=3), ValueError, "same T"),
        (_args(slot_dtype=torch.float32), TypeError, "int32 or int64"),
        (_args(cache_dtype=torch.long), TypeError, "kv_cache"),
        (_args(c_shape=(2, 2, 1)), ValueError, "\\[T, C\\]"),
    ],
)
def test_wrapper_rejects_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        store.store_latent(*args)


def test_selection_is_made_once_from_the_device():
    assert store.select_store_latent(torch.device("cpu")) is store.store_latent_ref
    assert store.select_store_latent("cuda") is store.store_latent
    assert store.select_store_latent("cpu", force_triton=True) is store.store_latent
    kv_cache, c_kv, k_pe, slot_mapping = make_case(6, 32, 16, 10, torch.float32, torch.float32, pad=1)
    expected = kv_cache.clone()
    store.store_latent_ref(expected, c_kv, k_pe, slot_mapping)
    store.store_latent_op(kv_cache, c_kv, k_pe, slot_mapping)
    assert torch.equal(kv_cache, expected)
