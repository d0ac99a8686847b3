"""fused_moe / fused_moe_fp8 (Triton, CPU interpreter) against their torch references.

Shapes are small but hit the edges: odd T, T below BLOCK_M, an expert with more
rows than BLOCK_M, experts with no rows, every row on one expert, -1 (skip)
entries, K = 1, E not a power of two, D and I off the tile sizes.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from .moe_utils import assert_close, kernel_device, kernel_module  # noqa: E402

from moemesh.model.checkpoint import quantize_fp8_blockwise  # noqa: E402

moe = kernel_module("moemesh.kernels.fused_moe")


def _weights(e: int, d: int, inter: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = torch.randn(e, 2 * inter, d, generator=gen) / d**0.5  # [E, 2I, D]
    w2 = torch.randn(e, d, inter, generator=gen) / inter**0.5  # [E, D, I]
    return w13, w2


def _routing(t: int, e: int, k: int, pattern: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, K] distinct experts per row (one layout per pattern) and positive weights."""
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])  # [T, K]
    if pattern == "skips":
        idx[0, -1] = -1
        idx[t // 2] = -1  # a row with nothing routed here
        idx[idx == e - 1] = -1  # the last expert gets no rows
    elif pattern == "one_expert":
        idx[:, 0] = 3  # every row on expert 3 (K = 1)
    elif pattern == "hot":
        idx[:, 0] = 0  # expert 0 gets every row: more than one BLOCK_M block
        idx[:, 1:] = torch.where(idx[:, 1:] == 0, e - 1, idx[:, 1:])
    weights = torch.rand(t, k, generator=gen) + 0.1
    return idx, weights


# name: (T, D, I, E, K, pattern)
CASES = {
    "odd_T_skips_empty_expert": (7, 40, 24, 6, 2, "skips"),
    "all_rows_one_expert_K1": (5, 24, 20, 12, 1, "one_expert"),
    "hot_expert_two_blocks": (19, 36, 20, 6, 3, "hot"),
    "multi_tile_D_I": (3, 72, 80, 12, 2, "random"),
}


def _naive(x, w13, w2, idx, weights):
    """Token by token, the definition (fp32)."""
    inter = w2.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e >= 0:
                gate_up = w13[e].float() @ x[t].float()
                h = F.silu(gate_up[:inter]) * gate_up[inter:]
                out[t] += weights[t, k] * (w2[e].float() @ h)
    return out


def test_reference_matches_the_definition():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 40, generator=gen)
    w13, w2 = _weights(6, 40, 24, gen)
    idx, weights = _routing(7, 6, 2, "skips", gen)
    torch.testing.assert_close(moe.fused_moe_ref(x, w13, w2, idx, weights), _naive(x, w13, w2, idx, weights))


def test_kernel_matches_expert_shard():
    """fused_moe is a drop-in for ExpertShard's math on a shard hosting every expert."""
    from moemesh.expert_node.shard import ExpertShard

    dev = kernel_device()
    t, d, inter, e, k, pattern = CASES["odd_T_skips_empty_expert"]
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(t, d, generator=gen)
    w13, w2 = _weights(e, d, inter, gen)
    idx, weights = _routing(t, e, k, pattern, gen)
    shard = ExpertShard(n_routed_experts=e)
    shard.add_experts(0, {i: (w13[i, :inter], w13[i, inter:], w2[i]) for i in range(e)})
    out = moe.fused_moe(x.to(dev), w13.to(dev), w2.to(dev), idx.to(dev), weights.to(dev))
    assert_close(out, shard.forward(0, x, idx, weights), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_moe_matches_reference(case, dtype):
    dev = kernel_device()
    t, d, inter, e, k, pattern = CASES[case]
    gen = torch.Generator().manual_seed(list(CASES).index(case))
    x = torch.randn(t, d, generator=gen)
    w13, w2 = _weights(e, d, inter, gen)
    idx, weights = _routing(t, e, k, pattern, gen)
    args = (x.to(dev, dtype), w13.to(dev, dtype), w2.to(dev, dtype), idx.to(dev), weights.to(dev))
    out = moe.fused_moe(*args)
    assert out.shape == (t, d) and out.dtype == dtype
    assert_close(out, moe.fused_moe_ref(*args), dtype)


def test_bf16_is_upcast_for_the_interpreter():
    dev = kernel_device()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 24, generator=gen)
    w13, w2 = _weights(6, 24, 20, gen)
    idx, weights = _routing(5, 6, 2, "random", gen)
    bf16 = torch.bfloat16
    args = (x.to(dev, bf16), w13.to(dev, bf16), w2.to(dev, bf16), idx.to(dev), weights.to(dev))
    assert_close(moe.fused_moe(*args), moe.fused_moe_ref(*args), torch.bfloat16)


def test_nothing_routed_gives_zeros():
    dev = kernel_device()
    w13, w2 = _weights(6, 24, 20, torch.Generator().manual_seed(4))
    x = torch.randn(3, 24, device=dev)
    idx = torch.full((3, 2), -1, dtype=torch.int64, device=dev)
    out = moe.fused_moe(x, w13.to(dev), w2.to(dev), idx, torch.ones(3, 2, device=dev))
    assert torch.equal(out.cpu(), torch.zeros(3, 24))
    empty = moe.fused_moe(x[:0], w13.to(dev), w2.to(dev), idx[:0], torch.ones(0, 2, device=dev))
    assert empty.shape == (0, 24)


def test_align_block_size_groups_and_pads():
    idx = torch.tensor([[2, 0], [2, -1], [5, 2], [0, 2]])  # A = 8, expert 2 has 4 rows, 0 has 2, 5 has 1
    sorted_ids, block_expert = moe.moe_align_block_size(idx, n_experts=6, block_m=2)
    n_assign = idx.numel()
    blocks = sorted_ids.view(-1, 2)
    used = block_expert >= 0
    assert block_expert[used].tolist() == [0, 2, 2, 5]  # one block per 2 rows, experts ascending
    assert (~used).sum() == block_expert.numel() - 4 and not used[4:].any()
    flat = idx.reshape(-1)
    for b, e in enumerate(block_expert[used].tolist()):
        for s in blocks[b].tolist():
            assert s == n_assign or int(flat[s]) == e
    got = sorted(s for s in sorted_ids.tolist() if s < n_assign)
    assert got == [i for i in range(n_assign) if flat[i] >= 0]  # every kept assignment once, -1 dropped


FP8_BLOCKS = {"16x16": (16, 16), "12x24_split_k_blocks": (12, 24)}  # 24 % 16 != 0: per-element dequant


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("block", list(FP8_BLOCKS))
def test_fused_moe_fp8_matches_reference(block, dtype):
    dev = kernel_device()
    bn_bk = FP8_BLOCKS[block]
    t, d, inter, e, k = 7, 40, 24, 6, 2  # D and 2I not multiples of the scale blocks
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(t, d, generator=gen)
    w13, w2 = _weights(e, d, inter, gen)
    idx, weights = _routing(t, e, k, "skips", gen)
    q13, s13 = map(torch.stack, zip(*(quantize_fp8_blockwise(w, bn_bk) for w in w13)))
    q2, s2 = map(torch.stack, zip(*(quantize_fp8_blockwise(w, bn_bk) for w in w2)))
    args = (x.to(dev, dtype), q13.to(dev), s13.to(dev), q2.to(dev), s2.to(dev), idx.to(dev), weights.to(dev))
    out = moe.fused_moe_fp8(*args, block=bn_bk)
    ref = moe.fused_moe_fp8_ref(*args, block=bn_bk)
    assert_close(out, ref, dtype)
    # and the FP8 result is close to the unquantized one (e4m3 keeps ~2 significant digits)
    full = moe.fused_moe_ref(x, w13, w2, idx, weights)
    assert (ref.float().cpu() - full).abs().max() < 0.1 * full.abs().max()


def test_fp8_bit_decoding_path(monkeypatch):
    """GPUs without native e4m3 get the weights as uint8 bits, decoded in the kernel."""
    dev = kernel_device()
    monkeypatch.setattr(moe, "_native_e4m3", lambda device: False)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 40, generator=gen)
    w13, w2 = _weights(6, 40, 24, gen)
    idx, weights = _routing(5, 6, 2, "skips", gen)
    q13, s13 = map(torch.stack, zip(*(quantize_fp8_blockwise(w, (16, 16)) for w in w13)))
    q2, s2 = map(torch.stack, zip(*(quantize_fp8_blockwise(w, (16, 16)) for w in w2)))
    args = (x.to(dev, torch.float16), q13.to(dev), s13.to(dev), q2.to(dev), s2.to(dev), idx.to(dev), weights.to(dev))
    assert_close(moe.fused_moe_fp8(*args, block=(16, 16)), moe.fused_moe_fp8_ref(*args, block=(16, 16)), torch.float16)


if moe.HAS_TRITON:

    @triton.jit
    def _decode_all_kernel(b_ptr, out_ptr):
        offs = tl.arange(0, 256)
        tl.store(out_ptr + offs, moe._e4m3_bits_to_fp16(tl.load(b_ptr + offs)))


def test_e4m3_bit_decoding_is_exact_for_every_code():
    dev = kernel_device()
    codes = torch.arange(256, dtype=torch.uint8)
    out = torch.empty(256, dtype=torch.float16, device=dev)
    _decode_all_kernel[(1,)](codes.to(dev), out)
    want = codes.view(torch.float8_e4m3fn).float()
    finite = ~want.isnan()  # 0x7f and 0xff
    assert torch.equal(out.cpu().float()[finite], want[finite])


def test_wrappers_reject_bad_inputs():
    w13, w2 = _weights(4, 16, 8, torch.Generator().manual_seed(6))
    x = torch.randn(3, 16)
    idx, weights = torch.tensor([[0, 1], [2, 3], [1, -1]]), torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"ids in 0..4; they must be in 0..3"):
        moe.fused_moe(x, w13, w2, idx + 1, weights)
    with pytest.raises(ValueError, match="x has D = 17"):
        moe.fused_moe(torch.randn(3, 17), w13, w2, idx, weights)
    with pytest.raises(ValueError, match=r"w2 must be \[E, D, I\]"):
        moe.fused_moe(x, w13, w2[:, :, :4], idx, weights)
    with pytest.raises(ValueError, match="topk_weights must match"):
        moe.fused_moe(x, w13, w2, idx, weights[:, :1])
    with pytest.raises(ValueError, match="integer expert ids"):
        moe.fused_moe(x, w13, w2, idx.float(), weights)
    with pytest.raises(ValueError, match="x's dtype"):
        moe.fused_moe(x, w13.half(), w2.half(), idx, weights)
    q13, s13 = map(torch.stack, zip(*(quantize_fp8_blockwise(w, (16, 16)) for w in w13)))
    q2, s2 = map(torch.stack, zip(*(quantize_fp8_blockwise(w, (16, 16)) for w in w2)))
    with pytest.raises(ValueError, match="weight_block_size"):
        moe.fused_moe_fp8(x, q13, s13, q2, s2, idx, weights, block=(8, 8))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        moe.fused_moe_fp8(x, w13, s13, q2, s2, idx, weights, block=(16, 16))


def test_select_chooses_once_by_device():
    assert moe.select_fused_moe("cpu") is moe.fused_moe_ref
    assert moe.select_fused_moe(torch.device("cpu"), force_triton=True) is moe.fused_moe
    assert moe.select_fused_moe("cuda") is moe.fused_moe
    assert moe.select_fused_moe("cpu", fp8=True) is moe.fused_moe_fp8_ref
    assert moe.select_fused_moe("cuda", fp8=True) is moe.fused_moe_fp8
