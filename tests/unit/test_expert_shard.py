"""ExpertShard: grouped SwiGLU over any subset of routed experts, against a per-token reference loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moemesh.expert_backend import ExpertBackendError
from moemesh.expert_node.local_backend import LocalExpertBackend
from moemesh.expert_node.shard import ExpertShard
from moemesh.kernels import cpu_kernels

E, D, I, K, LAYER = 6, 8, 8, 2, 3  # D, I multiples of 8: grouped_mm wants 16-byte strides (bf16 too)


def make_weights(seed: int = 0) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        e: (torch.randn(I, D, generator=g), torch.randn(I, D, generator=g), torch.randn(D, I, generator=g) / 2)
        for e in range(E)
    }


def make_batch(T: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K).long()
    w = torch.rand(T, K, generator=g) + 0.1
    return x, idx, w


def reference(weights, x, idx, w, experts=None) -> torch.Tensor:
    """sum_k w_k * down(silu(gate x) * up x), one token and one expert at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if experts is not None and e not in experts:
                continue
            gate, up, down = weights[e]
            out[t] += w[t, k] * (down @ (F.silu(gate @ x[t]) * (up @ x[t])))
    return out


def shard_with(weights, experts, layer=LAYER) -> ExpertShard:
    s = ExpertShard(E)
    s.add_experts(layer, {e: weights[e] for e in experts})
    return s


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_full_shard_matches_reference():
    weights = make_weights()
    shard = shard_with(weights, range(E))
    x, idx, w = make_batch(13)
    out = shard.forward(LAYER, x, idx, w)
    assert out.shape == (13, D) and out.dtype == torch.float32
    close(out, reference(weights, x, idx, w))


def test_experts_with_no_rows():
    weights = make_weights()
    shard = shard_with(weights, range(E))
    x, _, w = make_batch(5)
    idx = torch.tensor([[1, 4]] * 5)  # experts 0, 2, 3, 5 get nothing
    close(shard.forward(LAYER, x, idx, w), reference(weights, x, idx, w))
    idx = torch.tensor([[5, 5]] * 5)  # a single expert, twice per row (weights add)
    close(shard.forward(LAYER, x, idx, w), reference(weights, x, idx, w))


def test_single_row_and_zero_rows():
    weights = make_weights()
    shard = shard_with(weights, range(E))
    x, idx, w = make_batch(1)
    close(shard.forward(LAYER, x, idx, w), reference(weights, x, idx, w))
    x, idx, w = make_batch(0)
    out = shard.forward(LAYER, x, idx, w)
    assert out.shape == (0, D)


def test_subset_gives_zeros_for_rows_routed_elsewhere():
    weights = make_weights()
    mine = {0, 2, 4}
    shard = shard_with(weights, mine)
    x, _, w = make_batch(4)
    idx = torch.tensor([[1, 3], [0, 5], [2, 4], [5, 1]])
    out = shard.forward(LAYER, x, idx, w)
    assert torch.equal(out[0], torch.zeros(D))
    assert torch.equal(out[3], torch.zeros(D))
    close(out, reference(weights, x, idx, w, experts=mine))
    # Nothing hosted for any row at all.
    idx = torch.tensor([[1, 3]] * 4)
    assert torch.equal(shard.forward(LAYER, x, idx, w), torch.zeros(4, D))


def test_disjoint_shards_sum_to_the_full_shard():
    weights = make_weights()
    full = shard_with(weights, range(E))
    a, b = shard_with(weights, [0, 3, 5]), shard_with(weights, [1, 2, 4])
    x, idx, w = make_batch(17, seed=5)
    close(a.forward(LAYER, x, idx, w) + b.forward(LAYER, x, idx, w), full.forward(LAYER, x, idx, w))


def test_unknown_layer_gives_zeros():
    shard = shard_with(make_weights(), range(E))
    x, idx, w = make_batch(3)
    assert torch.equal(shard.forward(LAYER + 1, x, idx, w), torch.zeros(3, D))


def test_layers_are_independent():
    w0, w1 = make_weights(0), make_weights(1)
    shard = ExpertShard(E)
    shard.add_experts(1, w0)
    shard.add_experts(2, w1)
    x, idx, w = make_batch(6)
    close(shard.forward(1, x, idx, w), reference(w0, x, idx, w))
    close(shard.forward(2, x, idx, w), reference(w1, x, idx, w))
    assert shard.hosted() == {1: list(range(E)), 2: list(range(E))}


def test_drop_and_add_experts():
    weights = make_weights()
    shard = shard_with(weights, range(E))
    x, idx, w = make_batch(11)
    shard.drop_experts(LAYER, [2, 5])
    assert shard.hosted() == {LAYER: [0, 1, 3, 4]}
    assert not shard.hosts(LAYER, 2) and shard.hosts(LAYER, 3)
    close(shard.forward(LAYER, x, idx, w), reference(weights, x, idx, w, experts={0, 1, 3, 4}))

    shard.drop_experts(LAYER, [0, 1, 3, 4, 2])  # dropping what is not there is harmless
    assert shard.hosted() == {}
    assert not shard.hosts(LAYER, 0)
    assert torch.equal(shard.forward(LAYER, x, idx, w), torch.zeros_like(x))

    shard.add_experts(LAYER, {5: weights[5]})
    shard.add_experts(LAYER, {2: weights[2], 0: weights[0]})
    assert shard.hosted() == {LAYER: [0, 2, 5]}
    close(shard.forward(LAYER, x, idx, w), reference(weights, x, idx, w, experts={0, 2, 5}))

    shard.add_experts(LAYER, {e: weights[e] for e in (1, 3, 4)})
    close(shard.forward(LAYER, x, idx, w), reference(weights, x, idx, w))


def test_add_replaces_an_experts_weights():
    weights, other = make_weights(0), make_weights(9)
    shard = shard_with(weights, range(E))
    shard.add_experts(LAYER, {3: other[3]})
    mixed = dict(weights)
    mixed[3] = other[3]
    x, idx, w = make_batch(9)
    close(shard.forward(LAYER, x, idx, w), reference(mixed, x, idx, w))


def test_add_copies_the_weights():
    weights = make_weights()
    shard = shard_with(weights, range(E))
    x, idx, w = make_batch(5)
    expected = reference(weights, x, idx, w)
    for gate, up, down in weights.values():
        gate.zero_(), up.zero_(), down.zero_()
    close(shard.forward(LAYER, x, idx, w), expected)


def test_add_expert_id_out_of_range_raises():
    weights = make_weights()
    shard = ExpertShard(E)
    with pytest.raises(ValueError, match="outside"):
        shard.add_experts(LAYER, {E: weights[0]})
    with pytest.raises(ValueError, match="outside"):
        shard.add_experts(LAYER, {-1: weights[0]})
    assert shard.hosted() == {}


def test_routed_id_too_large_raises():
    shard = shard_with(make_weights(), range(E))
    x, _, w = make_batch(2)
    with pytest.raises((IndexError, ValueError, RuntimeError)):
        shard.forward(LAYER, x, torch.tensor([[0, E], [1, 2]]), w)


def test_routed_id_below_minus_one_raises():
    shard = shard_with(make_weights(), range(E))
    x, _, w = make_batch(2)
    with pytest.raises(ValueError):
        shard.forward(LAYER, x, torch.tensor([[0, -2], [1, 2]]), w)


def test_minus_one_means_computed_elsewhere():
    """A dispatcher marks assignments that another replica computes with -1."""
    weights = make_weights()
    shard = shard_with(weights, range(E))
    x, idx, w = make_batch(5)
    masked = idx.clone()
    masked[::2, 0] = -1
    keep = w.clone()
    keep[::2, 0] = 0.0  # the reference skips them by weight
    close(shard.forward(LAYER, x, masked, w), reference(weights, x, idx, keep))


def test_bfloat16_shard_is_close_to_fp32():
    weights = make_weights()
    shard = ExpertShard(E, dtype=torch.bfloat16)
    shard.add_experts(LAYER, weights)
    x, idx, w = make_batch(7)
    out = shard.forward(LAYER, x, idx, w)
    assert out.dtype == x.dtype
    ref = reference(weights, x, idx, w)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 9, 40])
def test_half_weights_under_fp32_compute_equal_fp32_math_on_the_widened_weights(weight_dtype, T):
    # What --dtype auto gives a bf16 checkpoint on CPU: weights stay half in memory, the math is fp32, so
    # results equal fp32 math on the exactly widened weights (the kernel and every torch strategy alike).
    half = {e: tuple(t.to(weight_dtype) for t in ws) for e, ws in make_weights().items()}
    widened = {e: tuple(t.float() for t in ws) for e, ws in half.items()}
    x, idx, w = make_batch(T)
    ref = reference(widened, x, idx, w)
    for strategy in ExpertShard.STRATEGIES:
        if strategy == "kernel" and not cpu_kernels.available():
            continue  # no C compiler here: auto takes the torch strategies (checked in tests/kernels)
        shard = ExpertShard(E, torch.float32, strategy=strategy, weight_dtype=weight_dtype)
        shard.add_experts(LAYER, half)
        assert shard._layers[LAYER].w13.dtype == weight_dtype, strategy
        out = shard.forward(LAYER, x, idx, w)
        assert out.dtype == torch.float32
        close(out, ref)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: no whole-layer kernel")
@pytest.mark.parametrize("row_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T", [8, 40])  # within the kernel's limits for both weight dtypes, past fp32's
def test_half_rows_are_the_fp32_rows_layer_rounded_once(row_dtype, weight_dtype, T):
    # A GPU attention node sends bf16 rows to a CPU expert node: they widen exactly to fp32, so the layer is
    # the fp32 rows' layer (the whole-layer kernel where it takes them), summed over experts in fp32 and rounded
    # once (summing each expert's part into a half-precision output rounds once per expert: this test fails).
    half = {e: tuple(t.to(weight_dtype) for t in ws) for e, ws in make_weights().items()}
    shard = ExpertShard(E, torch.float32, weight_dtype=weight_dtype)
    shard.add_experts(LAYER, half)
    x, idx, w = make_batch(T)
    x = x.to(row_dtype)
    out = shard.forward(LAYER, x, idx, w)
    assert out.dtype == row_dtype
    assert torch.equal(out, shard.forward(LAYER, x.float(), idx, w).to(row_dtype))


def test_local_backend():
    weights = make_weights()
    backend = LocalExpertBackend(shard_with(weights, range(E)))
    x, idx, w = make_batch(4)
    close(backend.combine(backend.dispatch(LAYER, x, idx, w)), reference(weights, x, idx, w))
    with pytest.raises(ExpertBackendError):
        backend.dispatch(LAYER + 1, x, idx, w)


@pytest.mark.parametrize("strategy", ["grouped", "padded", "looped", "kernel", "auto"])
@pytest.mark.parametrize("T, subset", [(1, range(E)), (9, range(E)), (40, range(E)), (9, [0, 3, 5])])
def test_every_strategy_matches_reference(strategy, T, subset):
    if strategy == "kernel" and not cpu_kernels.available():
        pytest.skip("no C compiler: the CPU kernels are not built")
    weights = make_weights()
    shard = ExpertShard(E, strategy=strategy)
    shard.add_experts(LAYER, {e: weights[e] for e in subset})
    x, idx, w = make_batch(T)
    close(shard.forward(LAYER, x, idx, w), reference(weights, x, idx, w, experts=set(subset)))


def test_unaligned_sizes_fall_back_from_grouped_gemm():
    g = torch.Generator().manual_seed(0)
    weights = {e: (torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), torch.randn(7, 5, generator=g))
               for e in range(3)}
    shard = ExpertShard(3, strategy="grouped")
    shard.add_experts(0, weights)
    x = torch.randn(4, 7, generator=g)
    idx = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]])
    w = torch.rand(4, 2, generator=g)
    close(shard.forward(0, x, idx, w), reference(weights, x, idx, w))


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="strategy"):
        ExpertShard(E, strategy="fast")


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_snapshot_accepts_exactly_skips_and_hosted_ids(dtype):
    shard = shard_with(make_weights(), [1, 3])
    snap = shard.snapshot(LAYER)
    assert snap is shard.snapshot(LAYER) and shard.snapshot(LAYER + 1) is None
    ok = [[-1, 1], [3, -1]]
    assert snap.accepts_ids(np.array(ok, dtype=dtype))
    for bad in ([[0, 1]], [[-2, 1]], [[E, 1]], [[np.iinfo(dtype).max, 1]], [[np.iinfo(dtype).min, 1]]):
        assert not snap.accepts_ids(np.array(bad, dtype=dtype)), bad


def test_forward_with_a_checked_snapshot_computes_with_it():
    weights = make_weights()
    shard = shard_with(weights, range(E))
    x, idx, w = make_batch(5)
    snap = shard.snapshot(LAYER)
    shard.add_experts(LAYER + 1, {0: weights[0]})  # another layer changes: this one's snapshot stands
    close(shard.forward(LAYER, x, idx, w, host_ids=idx.numpy(), snapshot=snap), shard.forward(LAYER, x, idx, w))
