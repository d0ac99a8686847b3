"""The expert shard's device path on fake CUDA tensors: no CPU tensor, no host sync inside forward.

bf16 and FP8-kept shards, the local backend and the Dispatch service's compute step, through the real
fused-MoE ops the shard gets on CUDA (Triton launches registered as torch custom ops, whose fake
implementations check shapes and devices). The ops read the routing on the host when asked to check ids
(``check_ids=True``), which fails here: the shard must pass ``check_ids=False``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moemesh.expert_node.local_backend import LocalExpertBackend
from moemesh.expert_node.server import compute
from moemesh.expert_node.shard import ExpertShard
from moemesh.kernels.fused_moe import fused_moe, fused_moe_fp8
from moemesh.model.checkpoint import Fp8Tensor
from tests.fake_cuda import CUDA, fake_cuda

pytestmark = [pytest.mark.unit, pytest.mark.fake_cuda]

E, D, I, K, T, LAYER = 6, 64, 48, 2, 5, 1  # I = 48 is off the (32, 32) FP8 blocks: the padded layout
BLOCK = (32, 32)


def _fp8(rows, cols) -> Fp8Tensor:
    q = torch.randn(rows, cols, device="cuda").to(torch.float8_e4m3fn)
    s = torch.ones(-(-rows // BLOCK[0]), -(-cols // BLOCK[1]), device="cuda")
    return Fp8Tensor(q, s, BLOCK)


def bf16_shard() -> ExpertShard:
    shard = ExpertShard(E, torch.bfloat16, fused_moe=fused_moe, device=CUDA)
    w = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    shard.add_experts(LAYER, {e: (w(I, D), w(I, D), w(D, I)) for e in (0, 2, 3, 5)})
    return shard


def fp8_shard() -> ExpertShard:
    shard = ExpertShard(E, torch.bfloat16, device=CUDA, fp8_block=BLOCK, fused_moe_fp8=fused_moe_fp8)
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
                                        fused_moe_fp8=fused_moe_fp8)
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
