"""The expert shard's device path on fake CUDA tensors: no CPU tensor, no host sync inside forward.

bf16 and FP8-kept shards, the local backend and the Dispatch service's compute step. The fused ops are
stand-ins with the Triton ops' signatures, written in plain device-generic torch (the Triton kernels cannot
run on fake tensors until they are made fake-tensor compatible; then ``select_ops("cuda").fused_moe`` and
``select_fused_moe("cuda", fp8=True)`` can replace them here). Like the real ops, the stand-ins read the
routing on the host when asked to check ids (``check_ids=True``), which fails here: the shard must pass
``check_ids=False``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moemesh.expert_node.local_backend import LocalExpertBackend
from moemesh.expert_node.server import compute
from moemesh.expert_node.shard import ExpertShard
from moemesh.model.checkpoint import Fp8Tensor
from tests.fake_cuda import CUDA, fake_cuda

pytestmark = [pytest.mark.unit, pytest.mark.fake_cuda]

E, D, I, K, T, LAYER = 6, 64, 48, 2, 5, 1  # I = 48 is off the (32, 32) FP8 blocks: the padded layout
BLOCK = (32, 32)


def _swiglu_sum(x, w13, w2, topk_idx, topk_weights):
    """sum_k w_k * w2[e] @ (silu(gate[e] x) * up[e] x) by gathering each assignment's weights: [T, D]."""
    t, k = topk_idx.shape
    inter = w2.shape[-1]
    flat = topk_idx.reshape(-1).long()  # [T*K]
    g13 = w13.index_select(0, flat.clamp(min=0)).view(t, k, *w13.shape[1:])  # [T, K, 2I, D]
    g2 = w2.index_select(0, flat.clamp(min=0)).view(t, k, *w2.shape[1:])  # [T, K, D, I]
    gate_up = torch.einsum("tkod,td->tko", g13, x)  # [T, K, 2I]
    gate, up = gate_up.split(inter, dim=-1)  # (Python indexing of fake CUDA tensors fails on this build)
    h = F.silu(gate) * up  # [T, K, I]
    y = torch.einsum("tkdi,tki->tkd", g2, h)  # [T, K, D]
    weight = torch.where(topk_idx >= 0, topk_weights, torch.zeros_like(topk_weights))  # [T, K]
    return (y.float() * weight.float().unsqueeze(-1)).sum(1).to(x.dtype)


def standin_fused_moe(x, w13, w2, topk_idx, topk_weights, *, check_ids=True):
    if check_ids:
        int(topk_idx.min())  # what the Triton op does: a host read
    return _swiglu_sum(x, w13, w2, topk_idx, topk_weights)


def _dequant(q, s, block):  # [E, R, C] e4m3, [E, ceil(R/bn), ceil(C/bk)] -> [E, R, C] fp32, on q's device
    rows, cols = q.shape[1:]
    scale = s.repeat_interleave(block[0], dim=1).narrow(1, 0, rows).repeat_interleave(block[1], dim=2)
    scale = scale.narrow(2, 0, cols)
    return q.float() * scale


def standin_fused_moe_fp8(x, w13_q, w13_s, w2_q, w2_s, topk_idx, topk_weights, block=(128, 128), *,
                          check_ids=True):
    if check_ids:
        int(topk_idx.min())
    w13, w2 = _dequant(w13_q, w13_s, block).to(x.dtype), _dequant(w2_q, w2_s, block).to(x.dtype)
    return _swiglu_sum(x, w13, w2, topk_idx, topk_weights)


def _fp8(rows, cols) -> Fp8Tensor:
    q = torch.randn(rows, cols, device="cuda").to(torch.float8_e4m3fn)
    s = torch.ones(-(-rows // BLOCK[0]), -(-cols // BLOCK[1]), device="cuda")
    return Fp8Tensor(q, s, BLOCK)


def bf16_shard() -> ExpertShard:
    shard = ExpertShard(E, torch.bfloat16, fused_moe=standin_fused_moe, device=CUDA)
    w = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    shard.add_experts(LAYER, {e: (w(I, D), w(I, D), w(D, I)) for e in (0, 2, 3, 5)})
    return shard


def fp8_shard() -> ExpertShard:
    shard = ExpertShard(E, torch.bfloat16, device=CUDA, fp8_block=BLOCK, fused_moe_fp8=standin_fused_moe_fp8)
    shard.add_experts(LAYER, {e: (_fp8(I, D), _fp8(I, D), _fp8(D, I)) for e in (0, 2, 3, 5)})
    return shard


def routed(device="cuda"):
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16)
    idx = torch.randint(0, E, (T, K), device=device)
    return x, idx, torch.rand(T, K, device=device)


@pytest.mark.parametrize("make", [bf16_shard, fp8_shard], ids=["bf16", "fp8_kept"])
def test_shard_forward_on_cuda_is_sync_free(make):
    with fake_cuda() as fake:
        shard = make()
        le = shard._layers[LAYER]
        assert le.w13.device == le.slot_of.device == CUDA and shard.device.type == "cuda"
        if shard.fp8_block is not None:
            assert le.w13.dtype == torch.float8_e4m3fn and le.w13.shape == (4, 2 * 64, D)  # I padded to 64
            assert le.w13_scale_inv.device == CUDA and le.w13_scale_inv.shape == (4, 4, 2)
        x, idx, w = routed()
        with fake.audit() as audit:
            y = shard.forward(LAYER, x, idx, w, validate=False)  # ids from the model's own gate
        assert audit.cpu_ops == [] and audit.uploads == []
        assert y.device == CUDA and y.shape == (T, D) and y.dtype == torch.bfloat16
        # Validation against a host copy of the ids (the Dispatch path, strict) reads no device memory either.
        shard.strict = True
        host_ids = np.array([[0, 2], [3, -1], [5, 5], [0, 3], [2, 2]])
        with fake.audit() as audit:
            y = shard.forward(LAYER, x, idx, w, host_ids=host_ids)
        assert audit.cpu_ops == [] and y.device == CUDA
        with pytest.raises(ValueError, match=r"experts \[1\] are not hosted"):
            shard.forward(LAYER, x, idx, w, host_ids=np.array([[1, 0]] * T))


@pytest.mark.parametrize("make", [bf16_shard, fp8_shard], ids=["bf16", "fp8_kept"])
def test_validating_device_ids_is_a_host_read(make):
    """The default (validate on topk_idx itself) copies the ids to the host: fine on CPUs, caught here."""
    with fake_cuda():
        shard = make()
        x, idx, w = routed()
        with pytest.raises(Exception):
            shard.forward(LAYER, x, idx, w)


def test_fp8_experts_move_between_shards_on_cuda():
    with fake_cuda() as fake:
        a, b = fp8_shard(), ExpertShard(E, torch.bfloat16, device=CUDA, fp8_block=BLOCK,
                                        fused_moe_fp8=standin_fused_moe_fp8)
        with fake.audit() as audit:
            b.add_experts(LAYER, {e: t for e, t in a._export(LAYER).items() if e in (2, 5)})
            a.drop_experts(LAYER, [2, 5])
        assert audit.cpu_ops == []  # the e4m3 bytes stay on the device; only the slot table is uploaded
        assert a.hosted() == {LAYER: [0, 3]} and b.hosted() == {LAYER: [2, 5]}
        le = b._layers[LAYER]
        assert le.w13.dtype == torch.float8_e4m3fn and le.w13.device == le.w2_scale_inv.device == CUDA
        assert b.nbytes() == le.w13.numel() + le.w2.numel() + 4 * (le.w13_scale_inv.numel()
                                                                    + le.w2_scale_inv.numel()) + 8 * E


def test_local_backend_dispatch_and_combine_on_cuda():
    with fake_cuda() as fake:
        backend = LocalExpertBackend(bf16_shard())
        x, idx, w = routed()
        with fake.audit() as audit:
            y = backend.combine(backend.dispatch(LAYER, x, idx, w))
        assert audit.cpu_ops == [] and audit.uploads == []
        assert y.device == CUDA and y.shape == (T, D)


@pytest.mark.parametrize("make", [bf16_shard, fp8_shard], ids=["bf16", "fp8_kept"])
def test_dispatch_compute_copies_in_once_and_out_once(make):
    """The Dispatch service's step: host rows to the device, the shard, one copy of the result back."""
    with fake_cuda() as fake:
        shard = make()
        shard.strict = True
        x, idx, w = routed("cpu")
        with fake.audit() as audit:
            y = compute(shard, LAYER, x, idx, w, host_ids=np.array([[0, 2]] * T))
        assert y.device.type == "cpu" and y.dtype == x.dtype and y.shape == (T, D)
        assert [op for op, _ in audit.cpu_ops] == ["aten._to_copy.default"], audit.cpu_ops  # the copy back
