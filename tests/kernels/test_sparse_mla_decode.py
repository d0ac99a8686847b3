"""sparse_mla_decode (V3.2): the Triton kernel against the plain-torch reference, under the CPU interpreter.

Also the V3.2 cache row [c_kv | k_pe | indexer key]: the latent ops (store_latent, mla_decode and the
sparse decode) run on the view ``cache[:, :C + R]`` whose row stride is wider than its width, and the
indexer's key is stored by store_latent into ``cache[:, C + R:]`` with an empty rope part.
"""

from __future__ import annotations

import os

# Triton picks interpreted-or-compiled when a kernel module is imported: set this first.
# TRITON_INTERPRET=0 in the environment runs the compiled kernels on CUDA instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from .kernel_utils import assert_close, interpreting, kernel_device, load_kernel_module  # noqa: E402
from .test_mla_decode import make_case, to_device  # noqa: E402

mla = load_kernel_module("moemesh.kernels.mla_decode")
store = load_kernel_module("moemesh.kernels.cache_store")
sparse = load_kernel_module("moemesh.kernels.sparse_mla_decode")


def pick(ctx_lens, topk, *, skipped=0, past=0, seed=0, dtype=torch.int64):
    """[B, topk] positions: distinct ones below each context first (as many as fit), then `past` positions
    at or beyond the context and `skipped` -1s (both skipped by the op), the rest random valid ones."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in ctx_lens:
        take = min(n, topk - skipped - past)
        row = torch.randperm(max(n, 1), generator=gen)[:take].tolist() if n else []
        row += [n + i for i in range(past)] + [-1] * skipped
        row += [-1] * (topk - len(row))  # a short context: the indexer's masked picks
        perm = torch.randperm(topk, generator=gen)
        rows.append(torch.tensor(row)[perm])
    return torch.stack(rows).to(dtype)


def widen(case, extra: int, seed: int = 5):
    """The same cache as V3.2 lays it out: `extra` indexer-key columns after each row; returns the view."""
    gen = torch.Generator().manual_seed(seed)
    kv = case["kv_cache"]
    wide = torch.cat([kv, 1e4 * torch.randn(kv.shape[0], extra, generator=gen).to(kv.dtype)], dim=1)
    return {**case, "kv_cache": wide[:, : kv.shape[1]]}


# (context lengths, topk, H, C, R, block_size, num_splits, block_n, skipped, past)
CASES = {
    # contexts shorter and longer than topk; H < one head block; default splits
    "mixed": ([3, 20, 9, 33], 8, 3, 32, 16, 4, None, None, 0, 0),
    # H = 17 spans two head blocks; topk 24 not a multiple of block_n 16; skipped and past-the-end picks
    "two_head_blocks": ([40, 25], 24, 17, 64, 8, 8, 2, 16, 3, 2),
    # more splits than loop steps: empty splits, and a chunk of only skipped positions, weigh nothing
    "empty_splits": ([2, 30], 40, 16, 32, 16, 16, 4, 16, 6, 1),
    # a zero-length context (zeros out) beside a long one; block_size 1
    "zero_context": ([0, 50], 12, 4, 32, 16, 1, 2, 16, 0, 0),
}


def sparse_case(name, dtype, *, index_dtype=torch.int64):
    ctx_lens, topk, H, C, R, bs, num_splits, block_n, skipped, past = CASES[name]
    case = make_case(ctx_lens, H, C, R, bs, dtype, index_dtype=index_dtype)
    case["indices"] = pick(ctx_lens, topk, skipped=skipped, past=past, dtype=index_dtype)
    return case, dict(num_splits=num_splits, block_n=block_n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_ref(name, dtype):
    case, tiles = sparse_case(name, dtype, index_dtype=torch.int32 if dtype == torch.float16 else torch.int64)
    expected = sparse.sparse_mla_decode_ref(**case)
    got = sparse.sparse_mla_decode(**to_device(case, kernel_device()), **tiles)
    assert got.shape == expected.shape and got.dtype == dtype
    assert_close(got, expected, dtype)
    if CASES[name][0][0] == 0:
        assert torch.equal(got[0].cpu(), torch.zeros_like(got[0].cpu()))


@pytest.mark.parametrize("name", ["mixed", "two_head_blocks"])
def test_strided_rows_of_the_v32_cache(name):
    """On the view of a wider row (indexer key after the latent, huge values there) both paths read the latent."""
    case, tiles = sparse_case(name, torch.float32)
    expected = sparse.sparse_mla_decode_ref(**case)
    wide = widen(case, extra=24)
    assert wide["kv_cache"].stride(0) == case["kv_cache"].shape[1] + 24
    torch.testing.assert_close(sparse.sparse_mla_decode_ref(**wide), expected, atol=0, rtol=0)
    got = sparse.sparse_mla_decode(**to_device(wide, kernel_device()), **tiles)
    assert_close(got, expected, torch.float32)


def test_every_position_picked_is_dense_decode():
    """Top-k = the whole context (shuffled, padded with -1): the sparse op is mla_decode."""
    ctx_lens = [1, 6, 13]
    case = make_case(ctx_lens, 5, 32, 16, 4, torch.float32, seed=2)
    dense = mla.mla_decode_ref(**case)
    indices = pick(ctx_lens, 16, seed=2)
    torch.testing.assert_close(sparse.sparse_mla_decode_ref(**case, indices=indices), dense, atol=1e-6, rtol=1e-6)
    got = sparse.sparse_mla_decode(**to_device({**case, "indices": indices}, kernel_device()), num_splits=2)
    assert_close(got, dense, torch.float32)


def test_ref_matches_a_per_query_loop():
    """The reference against the definition: softmax over the selected, valid positions only."""
    case, _ = sparse_case("two_head_blocks", torch.float32)
    out = sparse.sparse_mla_decode_ref(**case)
    kv, bs, C = case["kv_cache"], case["block_size"], case["q_c"].shape[2]
    for b, n in enumerate(case["context_lens"].tolist()):
        picked = [p for p in case["indices"][b].tolist() if 0 <= p < n]
        slots = [int(case["block_tables"][b, p // bs]) * bs + p % bs for p in picked]
        ctx = kv[slots]  # [k, C + R]
        for h in range(case["q_c"].shape[1]):
            s = (ctx[:, :C] @ case["q_c"][b, h] + ctx[:, C:] @ case["q_pe"][b, h]) * case["softmax_scale"]
            torch.testing.assert_close(out[b, h], torch.softmax(s, 0) @ ctx[:, :C], atol=1e-5, rtol=1e-5)


def test_v32_row_store_then_decode_through_the_kernels():
    """V3.2's cache row written by the Triton store (latent on one view, the indexer key on the other) equals
    the reference's; then mla_decode and the sparse decode on the strided latent view match their references."""
    device = kernel_device()
    gen = torch.Generator().manual_seed(9)
    C, R, Di, H, bs, T = 32, 16, 24, 4, 4, 19
    cache = torch.randn(8 * bs + 1, C + R + Di, generator=gen)
    c_kv, k_pe = torch.randn(T, C, generator=gen), torch.randn(T, R, generator=gen)
    key = torch.randn(T, Di, generator=gen)
    slots = torch.randperm(8 * bs, generator=gen)[:T]
    want = cache.clone()
    store.store_latent_ref(want[:, : C + R], c_kv, k_pe, slots)
    store.store_latent_ref(want[:, C + R :], key, key[:, :0], slots)
    got = cache.to(device)
    store.store_latent(got[:, : C + R], c_kv.to(device), k_pe.to(device), slots.to(device))
    store.store_latent(got[:, C + R :], key.to(device), key[:, :0].to(device), slots.to(device))
    assert torch.equal(got.cpu(), want)
    assert torch.equal(want[slots, C + R :], key) and torch.equal(want[slots, :C], c_kv)

    # Two sequences of 11 and 8 tokens over shuffled blocks (some rows just written, some as they were).
    tables = torch.tensor([[2, 3, 5], [1, 6, 0]])
    lens = torch.tensor([11, 8])
    args = dict(q_c=torch.randn(2, H, C, generator=gen), q_pe=torch.randn(2, H, R, generator=gen),
                block_tables=tables, context_lens=lens, block_size=bs, softmax_scale=0.2)
    indices = torch.tensor([[10, 0, 4, -1, 7, 2], [7, 3, 1, 0, 9, -1]])
    latent = want[:, : C + R]
    dense_want = mla.mla_decode_ref(kv_cache=latent, **args)
    sparse_want = sparse.sparse_mla_decode_ref(kv_cache=latent, indices=indices, **args)
    dev = to_device(args, device)
    dense_got = mla.mla_decode(kv_cache=got[:, : C + R], **dev, num_splits=2, block_n=16)
    sparse_got = sparse.sparse_mla_decode(kv_cache=got[:, : C + R], indices=indices.to(device), **dev)
    assert_close(dense_got, dense_want, torch.float32)
    assert_close(sparse_got, sparse_want, torch.float32)
    compact = latent.contiguous()  # the same rows, no key columns: the wide stride changed nothing
    assert_close(dense_want, mla.mla_decode_ref(kv_cache=compact, **args), torch.float32)


def test_bf16_computes_through_fp32():
    case, tiles = sparse_case("mixed", torch.bfloat16)
    got = sparse.sparse_mla_decode(**to_device(case, kernel_device()), **tiles)
    assert got.dtype == torch.bfloat16
    if interpreting():  # the interpreter's bf16 arithmetic is wrong; the kernel upcasts, so the result is close
        assert_close(got, sparse.sparse_mla_decode_ref(**case), torch.bfloat16)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda c: c.update(indices=c["indices"][:1]), ValueError, "indices must be \\[B, topk\\]"),
        (lambda c: c.update(indices=c["indices"][0]), ValueError, "indices must be \\[B, topk\\]"),
        (lambda c: c.update(indices=c["indices"].float()), TypeError, "indices must be int32 or int64"),
        (lambda c: c.update(kv_cache=c["kv_cache"][:, :-1]), ValueError, "C \\+ R"),
        (lambda c: c.update(softmax_scale=math.inf), ValueError, "softmax_scale"),
        (lambda c: c.update(num_splits=0), ValueError, "num_splits"),
        (lambda c: c.update(block_n=8), ValueError, "block_n"),
    ],
)
def test_wrapper_rejects_bad_inputs(change, error, match):
    case, _ = sparse_case("mixed", torch.float32)
    case.update(num_splits=None, block_n=None)
    change(case)
    with pytest.raises(error, match=match):
        sparse.sparse_mla_decode(**case)


def test_selection_is_made_once_from_the_device():
    assert sparse.select_sparse_mla_decode(torch.device("cpu")) is sparse.sparse_mla_decode_ref
    assert sparse.select_sparse_mla_decode("cuda") is sparse.sparse_mla_decode
    assert sparse.select_sparse_mla_decode("cpu", force_triton=True) is sparse.sparse_mla_decode
