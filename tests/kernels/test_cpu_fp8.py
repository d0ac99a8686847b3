"""The CPU FP8 expert kernel (kernels/cpu_fp8.py): e4m3 decoded bit for bit as the checkpoint's dequantization,
a layer equal to the same layer over its dequantized fp32 twin (torch.equal), a row independent of its batch,
bad tensors refused with a message, and an FP8-kept CPU shard taking the kernel."""

from __future__ import annotations

import pytest
import torch

from moemesh.expert_node.shard import ExpertShard
from moemesh.kernels import cpu_fp8, cpu_kernels
from moemesh.model.checkpoint import Fp8Tensor, dequantize_fp8_blockwise

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels need a C compiler")]

# (E, I, D, block): DeepSeek's 128 blocks; blocks that do not divide the matrices (partial edge blocks);
# bk a multiple of the vector width (the in-register one-row path) and one that is not (through scratch).
SHAPES = [(6, 128, 256, (128, 128)), (5, 40, 96, (16, 32)), (4, 36, 72, (8, 12))]
ROWS = [1, 2, 3, 5, 17, 40]


def _e4m3(shape, g) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)


def _grid(rows: int, cols: int, block) -> tuple[int, int]:
    return -(-rows // block[0]), -(-cols // block[1])


def _experts(e, inter, d, block, g):
    w13, w2 = _e4m3((e, 2 * inter, d), g), _e4m3((e, d, inter), g)
    s13 = torch.rand(e, *_grid(2 * inter, d, block), generator=g) * 1e-3
    s2 = torch.rand(e, *_grid(d, inter, block), generator=g) * 1e-3
    return w13, s13, w2, s2


def _twin(q, s, block):
    return torch.stack([dequantize_fp8_blockwise(q[i], s[i], block) for i in range(q.shape[0])])


def _routing(t, k, n_experts, g):
    idx = torch.randint(-1, n_experts, (t, k), generator=g)  # -1: computed elsewhere
    return idx, torch.rand(t, k, generator=g)


def test_every_e4m3_code_dequantizes_as_the_checkpoint_does():
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # NaN codes: quantizers write none
    q = codes.repeat(5, 3)[:, :700].contiguous().view(torch.float8_e4m3fn)  # [5, 700]: partial column blocks
    g = torch.Generator().manual_seed(0)
    for block in [(128, 128), (2, 48), (3, 7)]:
        s = torch.rand(*_grid(5, 700, block), generator=g) + 0.25
        assert torch.equal(cpu_fp8.dequantize(q, s, block), dequantize_fp8_blockwise(q, s, block)), block


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"E{s[0]}-I{s[1]}-D{s[2]}-{s[3][0]}x{s[3][1]}")
def test_a_layer_equals_the_layer_over_its_dequantized_twin(shape):
    e, inter, d, block = shape
    g = torch.Generator().manual_seed(1)
    w13, s13, w2, s2 = _experts(e, inter, d, block, g)
    f13, f2 = _twin(w13, s13, block), _twin(w2, s2, block)
    n_experts = e + 3  # some logical ids have no slot here
    slot_of = torch.full((n_experts,), -1, dtype=torch.int64)
    slot_of[torch.randperm(n_experts, generator=g)[:e]] = torch.arange(e)
    for t in ROWS:
        x = torch.randn(t, d, generator=g)
        idx, w = _routing(t, 3, n_experts, g)
        got = cpu_fp8.moe_forward(x, idx, w, slot_of, w13, s13, w2, s2, block)
        assert torch.equal(got, cpu_kernels.moe_forward(x, idx, w, slot_of, f13, f2)), t
        assert got.abs().sum() > 0


def test_a_rows_bits_do_not_depend_on_its_batch():
    e, inter, d, block = SHAPES[0]
    g = torch.Generator().manual_seed(2)
    w13, s13, w2, s2 = _experts(e, inter, d, block, g)
    slot_of = torch.arange(e)
    x = torch.randn(33, d, generator=g)
    idx = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(33)])
    w = torch.rand(33, 2, generator=g)
    whole = cpu_fp8.moe_forward(x, idx, w, slot_of, w13, s13, w2, s2, block)
    for r in (0, 7, 32):
        alone = cpu_fp8.moe_forward(x[r:r + 1], idx[r:r + 1], w[r:r + 1], slot_of, w13, s13, w2, s2, block)
        assert torch.equal(alone[0], whole[r]), r


def test_bad_tensors_are_refused_with_what_to_fix():
    e, inter, d, block = SHAPES[1]
    g = torch.Generator().manual_seed(3)
    w13, s13, w2, s2 = _experts(e, inter, d, block, g)
    x, slot_of = torch.randn(2, d), torch.arange(e)
    idx, w = _routing(2, 2, e, g)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        cpu_fp8.moe_forward(x, idx, w, slot_of, w13.float(), s13, w2, s2, block)
    with pytest.raises(ValueError, match="scale_inv must be a contiguous"):
        cpu_fp8.moe_forward(x, idx, w, slot_of, w13, s13[:, :-1].contiguous(), w2, s2, block)
    with pytest.raises(ValueError, match="not \\[E, 2I, D\\] and \\[E, D, I\\]"):
        cpu_fp8.moe_forward(x, idx, w, slot_of, w13, s13, w2[:, :, :8].contiguous(), s2[:, :, :1].contiguous(), block)
    with pytest.raises(ValueError, match="positive"):
        cpu_fp8.dequantize(w13[0], s13[0], (0, 16))


def test_an_fp8_kept_cpu_shard_runs_the_kernel():
    e, inter, d, block = SHAPES[0]
    g = torch.Generator().manual_seed(4)
    w13, s13, w2, s2 = _experts(e, inter, d, block, g)

    def no_reference(*_a, **_k):
        raise AssertionError("the dequantizing reference ran where the CPU kernel applies")

    shard = ExpertShard(e, fp8_block=block, fused_moe_fp8=no_reference)
    weights = {}
    for i in range(e):
        gate = Fp8Tensor(w13[i, :inter].contiguous(), s13[i, :inter // 128].contiguous(), block)
        up = Fp8Tensor(w13[i, inter:].contiguous(), s13[i, inter // 128:].contiguous(), block)
        weights[i] = (gate, up, Fp8Tensor(w2[i], s2[i], block))
    shard.add_experts(0, weights)
    x = torch.randn(9, d, generator=g)
    idx = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(9)])
    w = torch.rand(9, 2, generator=g)
    got = shard.forward(0, x, idx, w)
    want = cpu_fp8.moe_forward(x, idx, w, torch.arange(e), w13, s13, w2, s2, block)
    assert torch.equal(got, want)
    # rows in bf16 (a GPU attention node's wire dtype) take the kernel too, in fp32, answered in bf16
    x16 = x.bfloat16()
    want16 = cpu_fp8.moe_forward(x16.float(), idx, w, torch.arange(e), w13, s13, w2, s2, block).bfloat16()
    assert torch.equal(shard.forward(0, x16, idx, w), want16)
