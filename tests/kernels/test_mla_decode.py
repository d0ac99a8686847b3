"""mla_decode: the split-KV Triton kernel against the plain-torch reference, under the CPU interpreter."""

from __future__ import annotations

import os

# Triton picks interpreted-or-compiled when a kernel module is imported: set this first.
# TRITON_INTERPRET=0 in the environment runs the compiled kernels on CUDA instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from .kernel_utils import assert_close, kernel_device, load_kernel_module  # noqa: E402

mla = load_kernel_module("moemesh.kernels.mla_decode")


def make_case(ctx_lens, H, C, R, block_size, dtype, *, kv_dtype=None, index_dtype=torch.int32, seed=0):
    """A paged cache with shuffled physical blocks, a null slot at the end and garbage past each table."""
    gen = torch.Generator().manual_seed(seed)
    kv_dtype = kv_dtype or dtype
    B = len(ctx_lens)
    need = [-(-n // block_size) for n in ctx_lens]
    max_blocks = max(need) + 1  # one spare column that must never be read
    num_blocks = sum(need) + 2
    physical = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((B, max_blocks), 10**6, dtype=torch.int64)  # out-of-range garbage
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = physical[used : used + n]
        used += n
    kv_cache = torch.randn(num_blocks * block_size + 1, C + R, generator=gen)
    kv_cache[-1] = 0.0  # the runner's null slot
    q_c = torch.randn(B, H, C, generator=gen)
    q_pe = torch.randn(B, H, R, generator=gen)
    return dict(
        q_c=q_c.to(dtype),
        q_pe=q_pe.to(dtype),
        kv_cache=kv_cache.to(kv_dtype),
        block_tables=tables.to(index_dtype),
        context_lens=torch.tensor(ctx_lens, dtype=index_dtype),
        block_size=block_size,
        softmax_scale=(C + R) ** -0.5,
    )


def to_device(case, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


# (context lengths, H, C, R, block_size, num_splits, block_n): each hits a different edge.
CASES = {
    # length 1, exactly one block, a partial block, several blocks; H < one head block; default splits
    "mixed_lengths": ([1, 4, 7, 13], 3, 32, 16, 4, None, None),
    # H = 17 spans two head blocks; R = 8 pads to 16; lengths at and just past the 16-wide split chunks
    "split_boundaries": ([16, 17, 33, 5], 17, 64, 8, 8, 3, 16),
    # more splits than positions: empty splits must weigh nothing in the merge
    "empty_splits": ([2, 1], 16, 32, 16, 16, 4, 16),
    # block_size 1, several loop steps inside one split
    "long_split": ([40], 4, 32, 16, 1, 2, 16),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_ref(name, dtype):
    ctx_lens, H, C, R, block_size, num_splits, block_n = CASES[name]
    case = make_case(ctx_lens, H, C, R, block_size, dtype, index_dtype=torch.int32 if H % 2 else torch.int64)
    expected = mla.mla_decode_ref(**case)
    got = mla.mla_decode(**to_device(case, kernel_device()), num_splits=num_splits, block_n=block_n)
    assert got.shape == expected.shape and got.dtype == dtype
    assert_close(got, expected, dtype)


def test_bf16_computes_through_fp32():
    case = make_case([1, 4, 7, 13], 3, 32, 16, 4, torch.bfloat16)
    got = mla.mla_decode(**to_device(case, kernel_device()), num_splits=2, block_n=16)
    assert got.dtype == torch.bfloat16
    assert_close(got, mla.mla_decode_ref(**case), torch.bfloat16)


def test_cache_dtype_differs_from_query():
    """An fp16 cache under fp32 queries is read in the query's dtype, like the model does."""
    case = make_case([5, 9], 5, 32, 16, 4, torch.float32, kv_dtype=torch.float16)
    got = mla.mla_decode(**to_device(case, kernel_device()), num_splits=2, block_n=16)
    assert_close(got, mla.mla_decode_ref(**case), torch.float32)


def test_strided_queries_and_zero_length_context():
    case = make_case([0, 6], 4, 32, 16, 4, torch.float32)
    wide = torch.randn(2, 8, 32)
    case["q_c"] = wide[:, ::2]  # head stride 2 * C
    got = mla.mla_decode(**to_device(case, kernel_device()), num_splits=2, block_n=16)
    expected = mla.mla_decode_ref(**case)
    assert torch.equal(expected[0], torch.zeros_like(expected[0]))
    assert_close(got, expected, torch.float32)


def test_ref_matches_a_per_sequence_loop():
    """The reference itself against the definition, one sequence and one head at a time."""
    case = make_case([1, 6, 11], 2, 32, 16, 4, torch.float32, seed=3)
    out = mla.mla_decode_ref(**case)
    kv, bs, C = case["kv_cache"], case["block_size"], case["q_c"].shape[2]
    for b, n in enumerate(case["context_lens"].tolist()):
        slots = [int(case["block_tables"][b, p // bs]) * bs + p % bs for p in range(n)]
        ctx = kv[slots]  # [n, C + R]
        for h in range(case["q_c"].shape[1]):
            s = (ctx[:, :C] @ case["q_c"][b, h] + ctx[:, C:] @ case["q_pe"][b, h]) * case["softmax_scale"]
            w = torch.exp(s - s.max())
            want = (w / w.sum()) @ ctx[:, :C]
            torch.testing.assert_close(out[b, h], want, atol=1e-5, rtol=1e-5)


def test_default_num_splits_is_bounded():
    assert mla._pick_num_splits(1, 1, 16, 32, torch.device("cpu")) == 1
    assert 1 <= mla._pick_num_splits(64, 8, 1 << 16, 32, torch.device("cpu")) <= mla._MAX_SPLITS


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda c: c.update(kv_cache=c["kv_cache"][:, :-1]), ValueError, "C \\+ R"),
        (lambda c: c.update(q_pe=c["q_pe"][:1]), ValueError, "same B, H"),
        (lambda c: c.update(block_tables=c["block_tables"].float()), TypeError, "int32 or int64"),
        (lambda c: c.update(context_lens=c["context_lens"][:1]), ValueError, "context_lens must be"),
        (lambda c: c.update(q_pe=c["q_pe"].half()), TypeError, "share one dtype"),
        (lambda c: c.update(block_size=0), ValueError, "block_size"),
        (lambda c: c.update(softmax_scale=math.nan), ValueError, "softmax_scale"),
        (lambda c: c.update(num_splits=0), ValueError, "num_splits"),
        (lambda c: c.update(block_n=24), ValueError, "block_n"),
    ],
)
def test_wrapper_rejects_bad_inputs(change, error, match):
    case = make_case([3, 5], 2, 32, 16, 4, torch.float32)
    case.update(num_splits=None, block_n=None)
    change(case)
    with pytest.raises(error, match=match):
        mla.mla_decode(**case)


def test_selection_is_made_once_from_the_device():
    assert mla.select_mla_decode(torch.device("cpu")) is mla.mla_decode_ref
    assert mla.select_mla_decode("cuda") is mla.mla_decode
    assert mla.select_mla_decode("cpu", force_triton=True) is mla.mla_decode
    case = make_case([3, 5], 2, 32, 16, 4, torch.float32)
    torch.testing.assert_close(mla.mla_decode_op(**case), mla.mla_decode_ref(**case), atol=0, rtol=0)
