"""Prefill-sized routed experts on AMX tiles (kernels/cpu_amx.c): fp32-exact rows over bf16 weights.

Each fp32 row is split into three bf16 terms that sum to it exactly, so against float64 math the layer
differs only by fp32 summation order, like the AVX-512 kernel: the bounds are the same few ulps of the row
sums. The kernel tests skip where this CPU or build has no AMX (the chooser tests run everywhere).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moemesh.expert_node.shard import ExpertShard
from moemesh.kernels import cpu_kernels
from moemesh.kernels.cpu_paths import AMX_MIN_ROWS, KERNEL_MAX_ROWS_HALF, amx_fits, choose_expert_path

from .moe_utils import sorted_experts_ref

needs_amx = pytest.mark.skipif(not (cpu_kernels.available() and cpu_kernels.amx_ready()),
                               reason="no AMX-BF16 on this CPU, or the kernels were built without it")


def test_choose_expert_path_takes_amx_for_many_rows_of_bf16():
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    assert choose_expert_path(AMX_MIN_ROWS, bf16, True, amx_ok=True) == "amx"
    assert choose_expert_path(AMX_MIN_ROWS - 1, bf16, True, amx_ok=True) == "kernel"
    assert choose_expert_path(KERNEL_MAX_ROWS_HALF + 1, bf16, True, amx_ok=True) == "amx"  # no upper limit
    assert choose_expert_path(KERNEL_MAX_ROWS_HALF + 1, bf16, True, amx_ok=False) == "torch"
    assert choose_expert_path(AMX_MIN_ROWS, f16, True, amx_ok=True) == "kernel"  # AMX-BF16 takes bf16 only
    assert choose_expert_path(AMX_MIN_ROWS, f32, True, amx_ok=True) == "kernel"
    assert choose_expert_path(AMX_MIN_ROWS, bf16, False, amx_ok=True) == "torch"  # no library: no AMX either


def test_amx_fits_whole_tiles_only():
    assert amx_fits(7168, 2048) and amx_fits(2048, 1408) and amx_fits(64, 32)
    assert not amx_fits(64, 48) and not amx_fits(24, 32)


def _experts(E: int, D: int, I: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(E, 2 * I, D, generator=g) * 0.1).bfloat16(),
            (torch.randn(E, D, I, generator=g) * 0.1).bfloat16())


def _offs(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(counts).cumsum(0)])


@needs_amx
@pytest.mark.parametrize("counts", [[1, 0, 2], [15, 16, 17], [0, 33, 0], [40, 1, 100]])
@pytest.mark.parametrize("D, I", [(64, 32), (96, 64)])
def test_moe_swiglu_amx_matches_float64(counts, D, I):
    w13, w2 = _experts(len(counts), D, I, seed=sum(counts) + D)
    offs = _offs(counts)
    xs = torch.randn(int(offs[-1]), D, generator=torch.Generator().manual_seed(1)) * 3
    got, ref = cpu_kernels.moe_swiglu_amx(xs, offs, w13, w2), sorted_experts_ref(xs, offs, w13, w2)
    # fp32 rounding of the row sums (measured ~1.3e-7 of the largest output, as the AVX-512 kernel's), where
    # two bf16 terms instead of three measured 3.5-5e-6: the bound tells fp32-exact rows from 16-bit ones
    bound = 1e-6 * float(ref.abs().max())
    torch.testing.assert_close(got, ref, rtol=0, atol=bound)
    torch.testing.assert_close(got, cpu_kernels.moe_swiglu(xs, offs, w13, w2), rtol=0, atol=2 * bound)


@needs_amx
def test_a_rows_amx_bits_do_not_depend_on_the_rows_beside_it():
    # every output column is summed over k in one order whatever the other columns hold, so a row computed
    # alone, among 16, or among 47 (other padding, other column tiles) gives the same bits
    w13, w2 = _experts(2, 64, 32, seed=3)
    rows = torch.randn(47, 64, generator=torch.Generator().manual_seed(4))
    alone = cpu_kernels.moe_swiglu_amx(rows[5:6], _offs([1, 0]), w13, w2)
    among16 = cpu_kernels.moe_swiglu_amx(rows[:16], _offs([16, 0]), w13, w2)
    among47 = cpu_kernels.moe_swiglu_amx(rows, _offs([47, 0]), w13, w2)
    assert torch.equal(alone[0], among16[5]) and torch.equal(alone[0], among47[5])
    one, two = (cpu_kernels.moe_swiglu_amx(rows, _offs([20, 27]), w13, w2, threads=t) for t in (1, 2))
    assert torch.equal(one, two)


@needs_amx
def test_tiny_and_huge_values_stay_fp32_exact():
    # three bf16 terms hold all 24 bits of an fp32 mantissa: rows far from 1 in either direction keep them
    w13, w2 = _experts(1, 64, 32, seed=5)
    g = torch.Generator().manual_seed(6)
    xs = torch.randn(20, 64, generator=g) * torch.logspace(-6, 6, 20).unsqueeze(1)
    got, ref = cpu_kernels.moe_swiglu_amx(xs, _offs([20]), w13, w2), sorted_experts_ref(xs, _offs([20]), w13, w2)
    scale = ref.abs().amax(dim=1, keepdim=True)
    assert ((got - ref).abs() <= 1e-6 * scale + 1e-30).all()


@needs_amx
def test_amx_inputs_are_checked():
    w13, w2 = _experts(2, 64, 32, seed=7)
    xs, offs = torch.randn(3, 64), _offs([2, 1])
    with pytest.raises(ValueError, match="bf16 experts with D and I multiples of 32"):
        cpu_kernels.moe_swiglu_amx(xs, offs, w13.float(), w2.float())
    w13o, w2o = _experts(2, 64, 48, seed=8)
    with pytest.raises(ValueError, match="multiples of 32"):
        cpu_kernels.moe_swiglu_amx(xs, offs, w13o, w2o)
    with pytest.raises(ValueError, match="offs must rise"):
        cpu_kernels.moe_swiglu_amx(xs, _offs([2, 2]), w13, w2)
    with pytest.raises(ValueError, match="amx_min_rows must be >= 0"):
        cpu_kernels.moe_forward(xs, torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1),
                                torch.arange(2), w13, w2, amx_min_rows=-1)


def _routing(T: int, E: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return idx, torch.rand(T, K, generator=g)


@needs_amx
def test_moe_forward_takes_amx_once_an_expert_has_enough_rows():
    E, D, I, K = 4, 64, 32, 2
    w13, w2 = _experts(E, D, I, seed=9)
    slot_of = torch.arange(E)
    for T, expect_amx in ((4, False), (40, True)):  # 4 tokens: 2 rows an expert at most; 40: ~20
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
        idx, w = _routing(T, E, K, seed=T)
        before = cpu_kernels.amx_layers_run()
        got = cpu_kernels.moe_forward(x, idx, w, slot_of, w13, w2, amx_min_rows=AMX_MIN_ROWS)
        assert (cpu_kernels.amx_layers_run() > before) == expect_amx
        avx = cpu_kernels.moe_forward(x, idx, w, slot_of, w13, w2)  # amx_min_rows=0: never AMX
        if not expect_amx:
            assert torch.equal(got, avx)
        torch.testing.assert_close(got, avx, rtol=1e-5, atol=1e-5 * float(avx.abs().max()))


@needs_amx
def test_a_bf16_shard_runs_a_prefill_sized_batch_on_amx():
    E, D, I, K, T = 8, 64, 32, 2, 200  # 200 tokens: past the AVX-512 kernel's 64-row limit, ~50 rows an expert
    w13, w2 = _experts(E, D, I, seed=10)
    experts = {e: (w13[e, :I].clone(), w13[e, I:].clone(), w2[e].clone()) for e in range(E)}
    shard = ExpertShard(E, torch.float32, weight_dtype=torch.bfloat16)
    shard.add_experts(0, experts)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(11))
    idx, w = _routing(T, E, K, seed=12)
    before = cpu_kernels.amx_layers_run()
    got = shard.forward(0, x, idx, w)
    assert cpu_kernels.amx_layers_run() == before + 1
    ref = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(idx[t, k])
            wg, wu, wd = (m.double() for m in experts[e])
            h = F.silu(x[t].double() @ wg.t()) * (x[t].double() @ wu.t())
            ref[t] += float(w[t, k]) * (h @ wd.t())
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_amx
def test_bf16_rows_from_a_gpu_attention_node_take_amx_too():
    E, D, I, K, T = 8, 64, 32, 2, 200
    w13, w2 = _experts(E, D, I, seed=10)
    shard = ExpertShard(E, torch.float32, weight_dtype=torch.bfloat16)
    shard.add_experts(0, {e: (w13[e, :I].clone(), w13[e, I:].clone(), w2[e].clone()) for e in range(E)})
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(11)).bfloat16()
    idx, w = _routing(T, E, K, seed=12)
    before = cpu_kernels.amx_layers_run()
    got = shard.forward(0, x, idx, w)
    assert cpu_kernels.amx_layers_run() == before + 1 and got.dtype == torch.bfloat16
    assert torch.equal(got, shard.forward(0, x.float(), idx, w).bfloat16())


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {k: v for k, v in cpu_kernels._state.items() if k != "amx"})
    monkeypatch.setenv("MOEMESH_CPU_AMX", "0")
    assert not cpu_kernels.amx_ready()
    with pytest.raises(RuntimeError, match="no AMX here"):
        cpu_kernels.moe_swiglu_amx(torch.randn(1, 64), _offs([1]), *_experts(1, 64, 32, seed=0))


@needs_amx
def test_moe_forward_splits_a_layer_by_rows_per_expert():
    # experts with AMX_MIN_ROWS rows or more take AMX, the others the AVX-512 kernel in the same call: a decode
    # batch where one expert is hot keeps the AVX-512 kernel's speed (and bits) on the rest
    E, D, I = 3, 64, 32
    w13, w2 = _experts(E, D, I, seed=13)
    counts = {0: AMX_MIN_ROWS + 8, 1: 3, 2: AMX_MIN_ROWS - 1}
    idx = torch.tensor([e for e, n in counts.items() for _ in range(n)]).unsqueeze(1)  # [T, 1]
    T = idx.shape[0]
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(14))
    w = torch.rand(T, 1, generator=torch.Generator().manual_seed(15))
    before = cpu_kernels.amx_layers_run()
    got = cpu_kernels.moe_forward(x, idx, w, torch.arange(E), w13, w2, amx_min_rows=AMX_MIN_ROWS)
    assert cpu_kernels.amx_layers_run() == before + 1
    avx = cpu_kernels.moe_forward(x, idx, w, torch.arange(E), w13, w2)
    hot = idx[:, 0] == 0
    assert torch.equal(got[~hot], avx[~hot])  # the AVX-512 kernel's rows, bit for bit
    amx = cpu_kernels.moe_swiglu_amx(x[hot], _offs([int(hot.sum()), 0, 0]), w13, w2)
    assert torch.equal(got[hot], w[hot] * amx)  # the AMX rows: AMX's bits, times the gate weight
