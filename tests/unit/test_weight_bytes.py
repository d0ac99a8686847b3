"""moemesh/model/weight_bytes.py: exact bytes per part on hand-computed configs, and the same sums as the
modules moemesh actually loads (the attention-side Transformer, the expert shard) in fp32, bf16 and FP8 kept."""

from __future__ import annotations

import pytest
import torch

from moemesh.model.config import ModelConfig
from moemesh.model.weight_bytes import (element_bytes, expert_bytes, roofline_fraction, roofline_step_s,
                                        weight_bytes)

pytestmark = pytest.mark.unit

# V2-like: no q_lora, greedy routing (no gate bias), one dense layer.
V2 = dict(model_type="deepseek_v2", vocab_size=100, hidden_size=8, intermediate_size=16, moe_intermediate_size=4,
          num_hidden_layers=3, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=4, qk_nope_head_dim=2,
          qk_rope_head_dim=2, v_head_dim=2, n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2,
          topk_method="greedy", first_k_dense_replace=1, torch_dtype="float32")
# V3.2-like: q_lora, noaux_tc (fp32 bias), the indexer (weights_proj fp32), no dense layer, two shared experts.
V32 = dict(model_type="deepseek_v32", vocab_size=10, hidden_size=8, intermediate_size=16, moe_intermediate_size=6,
           num_hidden_layers=2, num_attention_heads=2, q_lora_rank=4, kv_lora_rank=4, qk_nope_head_dim=2,
           qk_rope_head_dim=2, v_head_dim=2, n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=2,
           topk_method="noaux_tc", n_group=1, topk_group=1, first_k_dense_replace=0, index_topk=2,
           index_n_heads=2, index_head_dim=4, torch_dtype="bfloat16")


def test_v2_fp32_by_hand():
    wb = weight_bytes(ModelConfig.from_dict(V2), "float32")
    # MLA per layer: wq 8*2*(2+2)=64, wkv_a 8*(4+2)=48, kv_norm 4, wkv_b 4*2*(2+2)=32, wo 2*2*8=32: 180 values
    assert wb.attention == 3 * 180 * 4 == 2160
    assert wb.norms == (2 * 3 + 1) * 8 * 4 == 224  # attn_norm and ffn_norm per layer, the final norm
    assert wb.dense_mlp == 1 * 3 * 8 * 16 * 4 == 1536
    assert wb.shared_experts == 2 * 3 * 8 * 4 * 4 == 768
    assert wb.gates == 2 * 6 * 8 * 4 == 384
    assert wb.lm_head == 100 * 8 * 4 == 3200
    assert wb.expert == 3 * 8 * 4 * 4 == 384
    assert wb.dense == 8272
    assert wb.routed == 2 * 6 * 384 == 4608
    assert wb.step_bytes(experts_hit=5) == 8272 + 5 * 384
    assert wb.step_bytes(experts_hit=5, passes=2) == 2 * 8272 + 5 * 384


def test_v2_bf16_keeps_the_gate_fp32():
    wb = weight_bytes(ModelConfig.from_dict(V2), "bfloat16")
    assert (wb.attention, wb.norms, wb.dense_mlp, wb.shared_experts, wb.lm_head, wb.expert) == (
        1080, 112, 768, 384, 1600, 192)
    assert wb.gates == 384  # fp32 in any dtype, as Gate holds it
    assert wb.dense == 4328


def test_v32_bf16_and_fp8_experts_by_hand():
    cfg = ModelConfig.from_dict(V32)
    wb = weight_bytes(cfg, "bfloat16")
    # MLA: wq_a 32 + q_norm 4 + wq_b 4*2*4=32, wkv_a 48 + kv_norm 4 + wkv_b 32, wo 32 = 184 values x 2 B = 368;
    # indexer: wq_b 4*2*4=32 + wk 8*4=32 + k_norm 2*4=8 = 72 x 2 B = 144, weights_proj 8*2 x 4 B (fp32) = 64
    assert wb.attention == 2 * (368 + 144 + 64) == 1152
    assert wb.norms == 5 * 8 * 2 == 80
    assert wb.dense_mlp == 0
    assert wb.shared_experts == 2 * 3 * 8 * 6 * 2 * 2 == 1152
    assert wb.gates == 2 * (4 * 8 + 4) * 4 == 288  # weight and noaux_tc's bias
    assert wb.lm_head == 160
    assert wb.expert == 3 * 8 * 6 * 2 == 288
    assert wb.dense == 2832
    # FP8 (4, 4) blocks: I = 6 padded to 8; e4m3 3*8*8 = 192 B; scales w13 (16/4)*(8/4) = 8, w2 (8/4)*(8/4) = 4
    assert expert_bytes(cfg, 2, (4, 4)) == 192 + 12 * 4 == 240
    assert weight_bytes(cfg, "bfloat16", (4, 4)).expert == 240
    # bn != bk: I padded to 8 (bn 4); w13 scales (16/4)*ceil(8/8)=4, w2 (8/4)*ceil(8/8)=2
    assert expert_bytes(cfg, 2, (4, 8)) == 192 + 6 * 4


def test_roofline_arithmetic():
    assert roofline_step_s(2e9, 20.0) == pytest.approx(0.1)
    assert roofline_fraction(2e9, 5.0, 20.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="stream_gbps"):
        roofline_step_s(1.0, 0.0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        element_bytes("int8")


def _param_bytes(module: torch.nn.Module, skip: str) -> int:
    return sum(p.numel() * p.element_size() for name, p in module.named_parameters() if name != skip)


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3", "deepseek_v32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_loaded_modules(tmp_path, arch, dtype):
    from moemesh.attn_node.loader import load_transformer
    from moemesh.expert_node.loader import load_expert_shard
    from moemesh.model.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path, arch=arch, hidden_size=64, layers=3, experts=8, experts_per_token=2)
    cfg = ModelConfig.from_dir(path)
    # loaded on CPU: bf16 weights keep their norms and wkv_b in fp32, the activations' dtype there
    wb = weight_bytes(cfg, str(dtype).removeprefix("torch."), compute="float32")
    model = load_transformer(str(path), cfg, dtype, progress=False)
    assert wb.dense == _param_bytes(model, skip="embed.weight")
    shard = load_expert_shard(str(path), cfg, dtype=dtype, progress=False)
    slot_tables = len(cfg.moe_layers) * cfg.n_routed_experts * 8  # int64 id -> slot per layer
    assert wb.routed == shard.nbytes() - slot_tables


@pytest.mark.parametrize("block", [(32, 32), (16, 16), (32, 16)])
def test_fp8_kept_matches_the_shard(tmp_path, block):
    from moemesh.expert_node.loader import load_expert_shard
    from moemesh.model.checkpoint import write_fp8_twin
    from moemesh.model.tiny import write_tiny_checkpoint

    src = write_tiny_checkpoint(tmp_path / "src", arch="deepseek_v3", hidden_size=96, layers=3, experts=8,
                                experts_per_token=2)
    fp8 = write_fp8_twin(src, tmp_path / "fp8", block=block)
    cfg = ModelConfig.from_dir(fp8)
    shard = load_expert_shard(str(fp8), cfg, progress=False, keep_fp8=True)
    slot_tables = len(cfg.moe_layers) * cfg.n_routed_experts * 8
    assert weight_bytes(cfg, "float32", cfg.quant.block_size).routed == shard.nbytes() - slot_tables


# The published shapes (config.json of deepseek-ai/DeepSeek-V2-Lite and DeepSeek-V3): deploy/README.md's figures.
V2_LITE = dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
               moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None,
               kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
               n_shared_experts=2, num_experts_per_tok=6, topk_method="greedy", first_k_dense_replace=1,
               torch_dtype="bfloat16")
V3_FULL = dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
               moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
               kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
               n_shared_experts=1, num_experts_per_tok=8, topk_method="noaux_tc", n_group=8, topk_group=4,
               first_k_dense_replace=3, torch_dtype="bfloat16")


@pytest.mark.parametrize("config, expert, routed, dense, params_b", [
    (V2_LITE, 3 * 2048 * 1408 * 2, 26 * 64 * 17_301_504, 2_210_651_136, 15.7),
    (V3_FULL, 3 * 7168 * 2048 * 2, 58 * 256 * 88_080_384, 32_594_829_312, 671),
])
def test_published_models_in_bf16(config, expert, routed, dense, params_b):
    cfg = ModelConfig.from_dict(config)
    wb = weight_bytes(cfg, "bfloat16")
    assert (wb.expert, wb.routed, wb.dense) == (expert, routed, dense)
    embedding = cfg.vocab_size * cfg.hidden_size * 2
    # About the published parameter count at 2 bytes each (the fp32 gates are a rounding error).
    assert (wb.dense + wb.routed + embedding) / 2 / 1e9 == pytest.approx(params_b, rel=0.01)
