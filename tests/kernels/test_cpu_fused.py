"""The fused CPU kernels (kernels/cpu_gemv.c): a dense SwiGLU, a whole routed-expert layer with its routing
bookkeeping, and RMSNorm, each against float64 math or the torch code it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moemesh.expert_node.shard import ExpertShard
from moemesh.kernels import cpu_kernels
from moemesh.kernels.cpu_paths import KERNEL_MAX_ROWS_FP32, KERNEL_MAX_ROWS_HALF, cpu_rmsnorm, cpu_swiglu

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: CPU kernels not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _swiglu64(x, w1, w3, w2):
    x = x.double()
    return ((F.silu(x @ w1.double().t()) * (x @ w3.double().t())) @ w2.double().t()).float()


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 16])
def test_swiglu_matches_float64(dtype, m):
    g = torch.Generator().manual_seed(m)
    D, I = 24, 13  # partial vectors and partial 4-row blocks
    x = torch.randn(m, D, generator=g)
    w1, w3, w2 = (torch.randn(*s, generator=g).to(dtype) for s in ((I, D), (I, D), (D, I)))
    ref = _swiglu64(x, w1, w3, w2)
    torch.testing.assert_close(cpu_kernels.swiglu(x, w1, w3, w2), ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max()))
    torch.testing.assert_close(cpu_swiglu(x.view(1, m, D), w1, w3, w2), ref.view(1, m, D), rtol=1e-5,
                               atol=1e-4 * float(ref.abs().max()))


def _shard(dtype, E, D, I, hosted, g):
    shard = ExpertShard(E, torch.float32, weight_dtype=dtype)
    shard.add_experts(0, {e: (torch.randn(I, D, generator=g), torch.randn(I, D, generator=g),
                              torch.randn(D, I, generator=g)) for e in hosted})
    return shard


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 5, KERNEL_MAX_ROWS_FP32])
def test_moe_forward_equals_the_torch_strategy(dtype, T):
    """Unhosted experts and -1 (computed elsewhere) are skipped, exactly as the sorted torch path skips them."""
    g = torch.Generator().manual_seed(T)
    E, K, D, I = 8, 3, 24, 12
    shard = _shard(dtype, E, D, I, [0, 2, 3, 5, 6], g)
    x = torch.randn(T, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    idx[0, 0] = -1
    w = torch.rand(T, K, generator=g)
    le = shard.snapshot(0)
    got = cpu_kernels.moe_forward(x, idx, w, le.slot_of, le.w13, le.w2)
    shard.strategy = "looped"
    ref = shard.forward(0, x, idx, w)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max()))
    shard.strategy = "auto"  # the shard's own CPU path now takes the whole-layer call
    assert torch.equal(shard.forward(0, x, idx, w), got)


@needs_kernel
def test_moe_forward_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(3)
    E, K, D, I = 6, 2, 16, 8
    shard = _shard(torch.float32, E, D, I, range(E), g)
    le = shard.snapshot(0)
    x, idx, w = torch.randn(7, D, generator=g), torch.randint(0, E, (7, K), generator=g), torch.rand(7, K)
    idx[:, 1] = (idx[:, 0] + 1) % E
    whole = cpu_kernels.moe_forward(x, idx, w, le.slot_of, le.w13, le.w2)
    for r in range(7):
        assert torch.equal(cpu_kernels.moe_forward(x[r:r + 1], idx[r:r + 1], w[r:r + 1], le.slot_of, le.w13,
                                                   le.w2), whole[r:r + 1])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_bits_do_not_depend_on_which_side_of_the_row_limit_its_batch_is(dtype):
    """Up to the limit the shard runs the layer as one C call, past it the sorted torch path over the same
    per-expert kernel: each row's experts are summed in the same (slot) order on both sides."""
    g = torch.Generator().manual_seed(11)
    E, K, D, I = 48, 6, 32, 16
    limit = KERNEL_MAX_ROWS_FP32 if dtype == torch.float32 else KERNEL_MAX_ROWS_HALF
    shard = _shard(dtype, E, D, I, range(E), g)
    T = limit + 1
    x = torch.randn(T, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # distinct experts per row
    w = torch.rand(T, K, generator=g)
    past = shard.forward(0, x, idx, w)  # T = limit + 1: the sorted path
    within = shard.forward(0, x[:limit], idx[:limit], w[:limit])  # the one C call
    assert torch.equal(past[:limit], within)


@needs_kernel
def test_fused_inputs_are_checked():
    le = _shard(torch.float32, 4, 8, 4, range(4), torch.Generator().manual_seed(0)).snapshot(0)
    x, idx, w = torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.int64), torch.rand(3, 2)
    with pytest.raises(ValueError, match="topk_idx must be a contiguous \\[3, 2\\] torch.int64"):
        cpu_kernels.moe_forward(x, idx.int(), w, le.slot_of, le.w13, le.w2)
    with pytest.raises(ValueError, match="topk_weights must be a contiguous \\[3, 2\\] torch.float32"):
        cpu_kernels.moe_forward(x, idx, w[:2], le.slot_of, le.w13, le.w2)
    with pytest.raises(ValueError, match="x must be a \\[M, 8\\] float32"):
        cpu_kernels.moe_forward(x.double(), idx, w, le.slot_of, le.w13, le.w2)
    with pytest.raises(ValueError, match="w1 \\[4, 8\\], w3 \\[4, 8\\], w2 \\[8, 3\\] are not"):
        cpu_kernels.swiglu(x, torch.randn(4, 8), torch.randn(4, 8), torch.randn(8, 3))
    with pytest.raises(ValueError, match="weight must be a contiguous \\[8\\] torch.float32"):
        cpu_kernels.rmsnorm(x, torch.ones(8).double(), 1e-6)


@needs_kernel
def test_rmsnorm_matches_the_torch_ops():
    x = torch.randn(20, 40)[:, 3:36]  # strided rows, 33 wide: a partial vector
    weight = torch.randn(33)
    ref = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(cpu_kernels.rmsnorm(x, weight, 1e-6), ref, rtol=1e-6, atol=1e-6)
    assert cpu_rmsnorm(x.view(4, 5, 33), weight, 1e-6).shape == (4, 5, 33)
    assert cpu_rmsnorm(x.double(), weight, 1e-6) is None  # not the kernel's: the caller's torch ops run


def _mla_reference(q_nope, q_pe, wkv_b, cache, tables, lens, block_size, scale, max_s):
    from moemesh.kernels.mla_decode import mla_decode_ref

    N = q_nope.shape[-1]
    q_c = torch.einsum("bhn,hnc->bhc", q_nope, wkv_b[:, :N])
    o_c = mla_decode_ref(q_c, q_pe, cache, tables, lens, block_size, scale, max_context_len=max_s)
    return torch.einsum("bhc,hvc->bhv", o_c, wkv_b[:, N:])


@needs_kernel
@pytest.mark.parametrize("lens, max_s", [([5, 1, 0, 12], 12), ([9, 9, 3, 2], 7)])
def test_mla_decode_equals_the_reference(lens, max_s):
    """Paged rows through the block table, contexts clipped at max_s, an empty one giving zeros."""
    g = torch.Generator().manual_seed(max_s)
    B, H, N, R, C, V, bs = 4, 3, 8, 4, 20, 6, 4
    cache = torch.randn(64, C + R + 5, generator=g)[:, : C + R]  # strided rows (V3.2 keeps keys after them)
    tables = torch.randperm(16, generator=g)[: B * 4].view(B, 4)
    q_nope, q_pe = torch.randn(B, H, N, generator=g), torch.randn(B, H, R, generator=g)
    wkv_b = torch.randn(H, N + V, C, generator=g)
    ctx = torch.tensor(lens)
    got = cpu_kernels.mla_decode(q_nope, q_pe, wkv_b, cache, tables, ctx, bs, 0.3, max_s)
    ref = _mla_reference(q_nope, q_pe, wkv_b, cache, tables, ctx, bs, 0.3, max_s)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if lens[2] == 0:
        assert torch.equal(got[2], torch.zeros(H, V))


@needs_kernel
@pytest.mark.parametrize("B", [1, 2, 5])
def test_mla_decode_heads_split_across_threads_keep_their_bits(B):
    """Fewer sequences than twice the threads split their heads into chunks (batch 1 on every thread): each head's
    output is the one it gets when a single thread runs every head."""
    g = torch.Generator().manual_seed(B)
    H, N, R, C, V, bs = 7, 8, 4, 40, 6, 4  # heads that do not divide evenly into chunks
    cache = torch.randn(64, C + R, generator=g)
    tables = torch.randperm(16, generator=g)[: B * 3].view(B, 3)
    q_nope, q_pe = torch.randn(B, H, N, generator=g), torch.randn(B, H, R, generator=g)
    wkv_b = torch.randn(H, N + V, C, generator=g)
    ctx = torch.randint(1, 13, (B,), generator=g)
    alone = cpu_kernels.mla_decode(q_nope, q_pe, wkv_b, cache, tables, ctx, bs, 0.3, 12, threads=1)
    for threads in (2, 3, 8):
        assert torch.equal(cpu_kernels.mla_decode(q_nope, q_pe, wkv_b, cache, tables, ctx, bs, 0.3, 12,
                                                  threads=threads), alone)
    ref = _mla_reference(q_nope, q_pe, wkv_b, cache, tables, ctx, bs, 0.3, 12)
    torch.testing.assert_close(alone, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("shape", [(5, 16), (5, 3, 16)])
def test_rope_is_the_torch_ops_to_the_bit(interleave, shape):
    from moemesh.kernels.cpu_paths import cpu_rope

    g = torch.Generator().manual_seed(len(shape))
    base = torch.randn(*shape[:-1], 40, generator=g)[..., 7:23]  # strided rows and heads, unit element stride
    freqs = torch.arange(5.0)[:, None] * torch.rand(8, generator=g)[None]
    cos, sin = freqs.cos(), freqs.sin()
    x1, x2 = (base[..., 0::2], base[..., 1::2]) if interleave else base.chunk(2, dim=-1)
    c, s = cos.view(5, *(1,) * (base.dim() - 2), 8), sin.view(5, *(1,) * (base.dim() - 2), 8)
    ref = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)  # Rotary.apply's torch ops
    assert torch.equal(cpu_rope(base, cos, sin, interleave), ref)
    assert cpu_rope(base.double(), cos, sin, interleave) is None


@needs_kernel
def test_store_latent_writes_the_references_rows():
    from moemesh.kernels.cache_store import store_latent_ref
    from moemesh.kernels.cpu_paths import cpu_store_latent

    g = torch.Generator().manual_seed(2)
    C, R = 12, 4
    c_kv, k_pe = torch.randn(5, C, generator=g), torch.randn(5, R, generator=g)
    slots = torch.tensor([3, -1, 0, 7, 5])
    ref, got = torch.zeros(9, C + R + 3), torch.zeros(9, C + R + 3)  # V3.2's rows: the keys after the latent
    store_latent_ref(ref[:, : C + R], c_kv, k_pe, slots)
    cpu_store_latent(got[:, : C + R], c_kv, k_pe, slots)
    assert torch.equal(got, ref)
    with pytest.raises(IndexError, match="slot_mapping\\[1\\] = 9 is past the cache's 9 slots"):
        cpu_kernels.store_latent(got[:, : C + R], c_kv[:2], k_pe[:2], torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="kv_cache must be \\[slots, C \\+ R\\]"):  # the reference's own check
        cpu_store_latent(got, c_kv, k_pe, slots)
    half = torch.zeros(9, C + R, dtype=torch.bfloat16)  # not the kernel's: the reference stores it
    cpu_store_latent(half, c_kv, k_pe, slots)
    assert torch.equal(half[3], torch.cat([c_kv[0], k_pe[0]]).bfloat16())
