"""FP8 kept: an ExpertShard holding DeepSeek-V3 block-quantized experts as e4m3 + scales, against the same
checkpoint dequantized on load; loads, drops and moves keep the e4m3 bytes; memory is reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moemesh.expert_node.loader import load_expert_shard, load_experts, new_expert_shard
from moemesh.expert_node.shard import ExpertShard
from moemesh.kernels.fused_moe import fused_moe_fp8_ref, select_fused_moe
from moemesh.model.checkpoint import Checkpoint, Fp8Tensor, expert_tensor_names, write_fp8_twin
from moemesh.model.config import ModelConfig
from moemesh.model.tiny import write_tiny_checkpoint

pytestmark = pytest.mark.unit

# hidden 96 -> moe_intermediate_size I = 48. Blocks: (32, 32) leaves I off the block rows (gate/up padded),
# (16, 16) divides everything, (32, 16) has bn != bk (down's scale grid grows when I is padded).
BLOCKS = [(32, 32), (16, 16), (32, 16)]
TINY = dict(arch="deepseek_v3", hidden_size=96, layers=3, experts=8, experts_per_token=2)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("src"), **TINY)


@pytest.fixture(scope="module", params=BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def fp8(request, src, tmp_path_factory) -> Path:
    return write_fp8_twin(src, tmp_path_factory.mktemp("fp8") / "ckpt", block=request.param)


def batch(cfg: ModelConfig, t: int = 11, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, cfg.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.num_experts_per_tok]
                       for _ in range(t)])
    idx[0, 1] = -1  # an assignment computed elsewhere
    return x, idx, torch.rand(t, cfg.num_experts_per_tok, generator=g) + 0.1


def test_kept_shard_matches_the_dequantized_shard(fp8):
    cfg = ModelConfig.from_dir(fp8)
    kept = load_expert_shard(fp8, cfg, progress=False, keep_fp8=True)
    deq = load_expert_shard(fp8, cfg, progress=False)
    assert kept.fp8_block == cfg.quant.block_size and deq.fp8_block is None
    x, idx, w = batch(cfg)
    for layer in cfg.moe_layers:
        le = kept._layers[layer]
        assert le.w13.dtype == le.w2.dtype == torch.float8_e4m3fn
        bn, bk = cfg.quant.block_size
        padded = -(-cfg.moe_intermediate_size // bn) * bn  # I'
        assert le.w13.shape == (cfg.n_routed_experts, 2 * padded, cfg.hidden_size)
        assert le.w13_scale_inv.shape == (cfg.n_routed_experts, 2 * padded // bn, -(-cfg.hidden_size // bk))
        assert le.w2_scale_inv.shape == (cfg.n_routed_experts, -(-cfg.hidden_size // bn), -(-padded // bk))
        torch.testing.assert_close(kept.forward(layer, x, idx, w), deq.forward(layer, x, idx, w),
                                   rtol=1e-5, atol=1e-5)


def test_export_gives_back_the_stored_bytes(fp8):
    cfg = ModelConfig.from_dir(fp8)
    layer, experts = cfg.moe_layers[0], [1, 4, 6]
    kept = load_expert_shard(fp8, cfg, {layer: experts}, progress=False, keep_fp8=True)
    names = [n for e in experts for n in expert_tensor_names(layer, e)]
    stored = Checkpoint(fp8, cfg).load(names, dtype=torch.float32, progress=False, keep_fp8=True)
    exported = kept._export(layer)
    assert sorted(exported) == experts
    for e in experts:
        for got, name in zip(exported[e], expert_tensor_names(layer, e)):
            want = stored[name]
            assert isinstance(got, Fp8Tensor) and got.block == want.block
            assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8)), name
            assert torch.equal(got.scale_inv, want.scale_inv), name


def test_drop_add_and_move_keep_fp8(fp8):
    """Live rebalancing: experts dropped here and loaded (from the checkpoint or another shard) stay e4m3."""
    cfg = ModelConfig.from_dir(fp8)
    layer = cfg.moe_layers[0]
    full = load_expert_shard(fp8, cfg, {layer: list(range(8))}, progress=False, keep_fp8=True)
    x, idx, w = batch(cfg)
    want = full.forward(layer, x, idx, w)

    a = new_expert_shard(cfg, keep_fp8=True)
    load_experts(a, fp8, cfg, {layer: [0, 1, 2, 3, 4, 5]}, progress=False)  # what ShardFollower calls
    a.drop_experts(layer, [4, 5])
    b = load_expert_shard(fp8, cfg, {layer: [4, 5, 6, 7]}, progress=False, keep_fp8=True)
    assert a.hosted() == {layer: [0, 1, 2, 3]}
    torch.testing.assert_close(a.forward(layer, x, idx, w) + b.forward(layer, x, idx, w), want,
                               rtol=1e-5, atol=1e-5)
    a.add_experts(layer, {e: t for e, t in b._export(layer).items() if e in (4, 5)})  # moved, still FP8
    b.drop_experts(layer, [4, 5])
    assert a._layers[layer].w13.dtype == torch.float8_e4m3fn and a.hosted() == {layer: [0, 1, 2, 3, 4, 5]}
    torch.testing.assert_close(a.forward(layer, x, idx, w) + b.forward(layer, x, idx, w), want,
                               rtol=1e-5, atol=1e-5)
    a.drop_experts(layer, list(range(8)))
    assert a.hosted() == {} and a.nbytes() == 0


def test_nbytes_fp8_kept_vs_dequantized(fp8):
    cfg = ModelConfig.from_dir(fp8)
    kept = load_expert_shard(fp8, cfg, progress=False, keep_fp8=True)
    bf16 = load_expert_shard(fp8, cfg, dtype=torch.bfloat16, progress=False)
    n = len(cfg.moe_layers) * cfg.n_routed_experts
    raw = n * 3 * cfg.moe_intermediate_size * cfg.hidden_size  # e4m3 bytes as stored
    # bf16 is 2 bytes a weight; kept is 1 a weight (plus scales, plus padding when I is off the block rows).
    assert bf16.nbytes() >= 2 * raw
    assert raw <= kept.nbytes() < bf16.nbytes()
    if cfg.moe_intermediate_size % cfg.quant.block_size[0] == 0:
        assert kept.nbytes() < 0.6 * bf16.nbytes()


def test_keep_fp8_on_a_plain_checkpoint_loads_it_as_it_is(src):
    cfg = ModelConfig.from_dir(src)
    shard = load_expert_shard(src, cfg, {cfg.moe_layers[0]: [0, 1]}, progress=False, keep_fp8=True)
    assert shard.fp8_block is None and shard._layers[cfg.moe_layers[0]].w13.dtype == torch.float32


def test_fp8_op_is_chosen_from_the_device_when_not_injected(fp8):
    cfg = ModelConfig.from_dir(fp8)
    assert new_expert_shard(cfg, keep_fp8=True).fused_moe_fp8 is fused_moe_fp8_ref
    assert new_expert_shard(cfg, keep_fp8=True, fused_moe_fp8=len).fused_moe_fp8 is len


def test_wrong_kind_of_weights_is_refused():
    q = Fp8Tensor(torch.zeros(8, 16, dtype=torch.float8_e4m3fn), torch.ones(1, 1), (16, 16))
    qd = Fp8Tensor(torch.zeros(16, 8, dtype=torch.float8_e4m3fn), torch.ones(1, 1), (16, 16))
    dense = (torch.zeros(8, 16), torch.zeros(8, 16), torch.zeros(16, 8))
    with pytest.raises(ValueError, match="needs Fp8Tensor"):
        ExpertShard(4, fp8_block=(16, 16)).add_experts(0, {0: dense})
    with pytest.raises(ValueError, match="dequantizes"):
        ExpertShard(4).add_experts(0, {0: (q, q, qd)})
    with pytest.raises(ValueError, match=r"\(16, 16\) blocks, but this shard keeps \(32, 32\)"):
        ExpertShard(4, fp8_block=(32, 32)).add_experts(0, {0: (q, q, qd)})
    with pytest.raises(ValueError, match="all tensors or all Fp8Tensor"):
        ExpertShard(4, fp8_block=(16, 16)).add_experts(0, {0: (q, dense[1], qd)})
    with pytest.raises(ValueError, match="do not match"):
        ExpertShard(4, fp8_block=(16, 16)).add_experts(0, {0: (q, q, q)})


def test_kept_shard_under_the_triton_kernel_matches_the_reference(src, tmp_path):
    """The FP8 Triton op (interpreted on CPU: TRITON_INTERPRET=1 from tests/conftest.py) on the shard's layout."""
    pytest.importorskip("triton")
    from tests.kernels.moe_utils import kernel_module

    moe = kernel_module("moemesh.kernels.fused_moe")
    fp8 = write_fp8_twin(src, tmp_path / "fp8", block=(32, 32))  # I = 48: the padded gate/up layout
    cfg = ModelConfig.from_dir(fp8)
    layer = cfg.moe_layers[0]
    kernel = load_expert_shard(fp8, cfg, {layer: [0, 2, 3, 5, 7]}, progress=False, keep_fp8=True,
                               fused_moe_fp8=moe.select_fused_moe("cpu", True, fp8=True))
    assert kernel.fused_moe_fp8 is moe.fused_moe_fp8 and select_fused_moe("cpu", fp8=True) is fused_moe_fp8_ref
    ref = load_expert_shard(fp8, cfg, {layer: [0, 2, 3, 5, 7]}, progress=False, keep_fp8=True)
    x, idx, w = batch(cfg, t=5)
    torch.testing.assert_close(kernel.forward(layer, x, idx, w), ref.forward(layer, x, idx, w),
                               rtol=1e-4, atol=1e-4)
