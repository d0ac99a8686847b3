"""The CUDA op set (select_ops("cuda")) on fake CUDA tensors: shapes and devices out, nothing on the CPU, no host sync.

Each Triton launch is a ``moemesh::`` custom op whose fake impl runs under FakeTensorMode (no kernel,
no interpreter), while the torch glue around it (fused MoE's routing layout, the split partials, the
sum over K) runs for real on fake CUDA tensors. Inside the fake mode a host read (``.item()``,
``.tolist()``, ``int(t)``) or a data-dependent shape raises, and a CPU tensor meeting a CUDA one raises
FakeTensorDeviceMismatchError; ``audit.cpu_ops`` catches a CPU tensor made on the side.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from moemesh.kernels.mla_decode import mla_decode_ref  # noqa: E402
from moemesh.kernels.ops import select_ops  # noqa: E402
from moemesh.kernels.sparse_mla_decode import sparse_mla_decode_ref  # noqa: E402
from tests.fake_cuda import CUDA, fake_cuda  # noqa: E402

pytestmark = [pytest.mark.fake_cuda, pytest.mark.unit]

B, H, C, R, BLOCK, MAX_BLOCKS = 3, 16, 64, 16, 4, 5  # sequences, heads, latent, rope, block size, table width
T, E, K, D, I = 6, 8, 2, 32, 48  # tokens, experts, top_k, hidden, moe intermediate


class OpLog(TorchDispatchMode):
    """The ops dispatched inside it, so a test can see each launch went through its custom op."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def ops():
    return select_ops("cuda")


def _decode_inputs():
    q_c = torch.randn(B, H, C, device="cuda")
    q_pe = torch.randn(B, H, R, device="cuda")
    kv_cache = torch.randn(B * MAX_BLOCKS * BLOCK + 1, C + R, device="cuda")
    block_tables = torch.zeros(B, MAX_BLOCKS, dtype=torch.int64, device="cuda")
    context_lens = torch.ones(B, dtype=torch.int64, device="cuda")
    return q_c, q_pe, kv_cache, block_tables, context_lens


def _assert_clean(audit, log, *launches):
    assert audit.cpu_ops == [], audit.cpu_ops
    assert audit.uploads == [], audit.uploads
    for name in launches:
        assert f"moemesh.{name}.default" in log.names, (name, sorted(set(log.names)))


def test_ops_for_cuda_are_the_triton_kernels(ops):
    assert ops.mode == "triton"
    assert ops.fused_moe.keywords == {"check_ids": False} and ops.fused_moe_fp8.keywords == {"check_ids": False}


@pytest.mark.parametrize("max_context_len", [None, 7], ids=["capacity", "host_bound"])
def test_mla_decode(ops, max_context_len):
    with fake_cuda() as fake:
        args = _decode_inputs()
        with fake.audit() as audit, OpLog() as log:
            o_c = ops.mla_decode(*args, BLOCK, 0.1, max_context_len=max_context_len)  # [B, H, C]
    assert o_c.shape == (B, H, C) and o_c.device == CUDA and o_c.dtype == torch.float32
    _assert_clean(audit, log, "mla_decode_split", "mla_decode_merge")


def test_mla_decode_ref_with_a_host_bound_is_sync_free():
    """The reference reads context_lens on the host only when the caller does not say the longest context."""
    with fake_cuda() as fake:
        args = _decode_inputs()
        with fake.audit() as audit:
            o_c = mla_decode_ref(*args, BLOCK, 0.1, max_context_len=7)
        with pytest.raises(DataDependentOutputException):
            mla_decode_ref(*args, BLOCK, 0.1)
    assert o_c.shape == (B, H, C) and o_c.device == CUDA and audit.cpu_ops == []


@pytest.mark.parametrize("reference", [False, True], ids=["kernel", "reference"])
def test_sparse_mla_decode_on_the_strided_v32_row(ops, reference):
    """V3.2's decode over top-k rows of the latent view of a [C + R + Di] row: sync-free on both paths."""
    with fake_cuda() as fake:
        q_c, q_pe, _, block_tables, context_lens = _decode_inputs()
        row = torch.randn(B * MAX_BLOCKS * BLOCK + 1, C + R + 24, device="cuda")
        indices = torch.randint(-1, MAX_BLOCKS * BLOCK, (B, 6), device="cuda")
        op = sparse_mla_decode_ref if reference else ops.sparse_mla_decode
        with fake.audit() as audit, OpLog() as log:
            o_c = op(q_c, q_pe, row.narrow(1, 0, C + R), block_tables, context_lens, indices, BLOCK, 0.1)
    assert o_c.shape == (B, H, C) and o_c.device == CUDA and o_c.dtype == torch.float32
    _assert_clean(audit, log, *(() if reference else ("sparse_mla_decode_split", "mla_decode_merge")))


def test_store_latent_writes_in_place(ops):
    with fake_cuda() as fake:
        kv_cache = torch.zeros(40, C + R, dtype=torch.bfloat16, device="cuda")
        c_kv, k_pe = torch.randn(T, C, device="cuda"), torch.randn(T, R, device="cuda")
        slots = torch.arange(T, device="cuda") - 1  # one padding token (-1)
        with fake.audit() as audit, OpLog() as log:
            assert ops.store_latent(kv_cache, c_kv, k_pe, slots) is None
    assert kv_cache.shape == (40, C + R) and kv_cache.device == CUDA
    _assert_clean(audit, log, "store_latent")


ROUTES = {
    "softmax_greedy": dict(scoring_func="softmax", topk_method="greedy"),
    "softmax_group_limited": dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4,
                                  topk_group=2, routed_scaling_factor=16.0),
    "sigmoid_greedy": dict(scoring_func="sigmoid", topk_method="greedy", norm_topk_prob=True),
    "sigmoid_noaux_tc": dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                             norm_topk_prob=True, routed_scaling_factor=2.5),
    "softmax_noaux_tc": dict(scoring_func="softmax", topk_method="noaux_tc", n_group=2, topk_group=1),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ROUTES))
def test_route(ops, name):
    kw = dict(ROUTES[name])
    with fake_cuda() as fake:
        logits = torch.randn(T, E, dtype=torch.bfloat16, device="cuda")
        if kw["topk_method"] == "noaux_tc":
            kw["bias"] = torch.zeros(E, device="cuda")
        with fake.audit() as audit, OpLog() as log:
            idx, weights = ops.route(logits, top_k=K, **kw)  # [T, K], [T, K]
    assert idx.shape == weights.shape == (T, K) and idx.device == weights.device == CUDA
    assert idx.dtype == torch.int64 and weights.dtype == torch.float32
    _assert_clean(audit, log, "route")


def _routing():
    topk_idx = torch.randint(-1, E, (T, K), device="cuda")  # -1 = another node's
    return topk_idx, torch.rand(T, K, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_moe(ops, dtype):
    with fake_cuda() as fake:
        x = torch.randn(T, D, dtype=dtype, device="cuda")
        w13 = torch.randn(E, 2 * I, D, dtype=dtype, device="cuda")
        w2 = torch.randn(E, D, I, dtype=dtype, device="cuda")
        topk_idx, topk_weights = _routing()
        with fake.audit() as audit, OpLog() as log:
            y = ops.fused_moe(x, w13, w2, topk_idx, topk_weights)  # [T, D], as the shard calls it
    assert y.shape == (T, D) and y.device == CUDA and y.dtype == dtype
    _assert_clean(audit, log, "fused_moe_gate_up", "fused_moe_down")


@pytest.mark.parametrize("block", [(128, 128), (16, 24)], ids=["v3_blocks", "odd_blocks"])
def test_fused_moe_fp8(ops, block):
    bn, bk = block
    with fake_cuda() as fake:
        x = torch.randn(T, D, dtype=torch.bfloat16, device="cuda")
        w13_q = torch.empty(E, 2 * I, D, dtype=torch.float8_e4m3fn, device="cuda")
        w13_s = torch.ones(E, -(-2 * I // bn), -(-D // bk), device="cuda")
        w2_q = torch.empty(E, D, I, dtype=torch.float8_e4m3fn, device="cuda")
        w2_s = torch.ones(E, -(-D // bn), -(-I // bk), device="cuda")
        topk_idx, topk_weights = _routing()
        with fake.audit() as audit, OpLog() as log:
            # the call the FP8-kept expert shard makes
            y = ops.fused_moe_fp8(x, w13_q, w13_s, w2_q, w2_s, topk_idx, topk_weights, block, check_ids=False)
    assert y.shape == (T, D) and y.device == CUDA and y.dtype == torch.bfloat16
    _assert_clean(audit, log, "fused_moe_gate_up", "fused_moe_down")


def test_the_id_check_is_a_host_sync_kept_at_the_api_boundary(ops):
    """check_ids=True reads the ids on the host: the fake mode refuses it, which is why Ops turns it off."""
    with fake_cuda():
        x = torch.randn(T, D, device="cuda")
        w13, w2 = torch.randn(E, 2 * I, D, device="cuda"), torch.randn(E, D, I, device="cuda")
        topk_idx, topk_weights = _routing()
        with pytest.raises(DataDependentOutputException):
            ops.fused_moe(x, w13, w2, topk_idx, topk_weights, check_ids=True)


def test_fake_impls_check_the_op_contract():
    """A direct call of a moemesh:: op with a bad shape or a CPU tensor fails in its fake impl, not later."""
    with fake_cuda():
        q_c, q_pe, kv_cache, block_tables, context_lens = _decode_inputs()
        with pytest.raises(ValueError, match="moemesh::mla_decode_split: kv_cache"):
            narrow = kv_cache.narrow(1, 0, C + R - 1)  # one column short
            torch.ops.moemesh.mla_decode_split(q_c, q_pe, narrow, block_tables, context_lens, BLOCK, 0.1, 2, 32)
        with pytest.raises(ValueError, match="moemesh::store_latent: all tensors must be on one device"):
            torch.ops.moemesh.store_latent(kv_cache, q_c.select(1, 0), q_pe.select(1, 0),
                                           torch.zeros(B, dtype=torch.int64))


@pytest.mark.parametrize("bad", [-1, MAX_BLOCKS * BLOCK + 1, 2.0, True])
def test_max_context_len_is_checked_on_the_host(ops, bad):
    with fake_cuda():
        args = _decode_inputs()
        with pytest.raises(ValueError, match="max_context_len must be None or an int"):
            ops.mla_decode(*args, BLOCK, 0.1, max_context_len=bad)
        with pytest.raises(ValueError, match="max_context_len must be None or an int"):
            mla_decode_ref(*args, BLOCK, 0.1, max_context_len=bad)
