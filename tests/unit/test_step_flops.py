"""moemesh/model/step_flops.py: a decode step's multiply-adds on hand-computed configs (V2 without q_lora and with
a dense layer; V3.2 with q_lora and the indexer, which scores the context only past its top-k, and the top-k
capping the attended context)."""

from __future__ import annotations

import pytest

from moemesh.model.config import ModelConfig
from moemesh.model.step_flops import compute_step_s, step_flops, token_macs

from .test_weight_bytes import V2, V32

pytestmark = pytest.mark.unit


def test_v2_by_hand():
    cfg = ModelConfig.from_dict(V2)
    # per layer: wq 8*2*4=64, wkv_a 8*6=48, wkv_b 4*2*(2+2)=32, wo 2*2*8=32 (176); over the cache 2 heads x
    # (6 score + 4 value) = 20 per cached token. 3 layers; 1 dense MLP 3*8*16=384; 2 MoE layers x (1 shared +
    # 2 routed) x 3*8*4=96 = 576; gates 2*6*8=96; lm_head 100*8=800
    assert token_macs(cfg, 0) == 3 * 176 + 384 + 576 + 96 + 800 == 2384
    assert token_macs(cfg, 10) == 2384 + 3 * 20 * 10
    assert step_flops(cfg, batch=3, context=10) == 2 * 3 * 2984


def test_v32_by_hand_the_indexer_caps_attention_not_its_scores():
    cfg = ModelConfig.from_dict(V32)
    # per layer: wq_a 8*4=32, wq_b 4*2*4=32, wkv_a 48, wkv_b 32, wo 32, indexer wq_b 4*2*4=32 + wk 8*4=32 +
    # weights_proj 8*2=16 (256); attention over min(context, index_topk=2) tokens at 20 each; past index_topk the
    # indexer scores every cached token: 2 heads x (4 dims + 1 head weight) = 10. No dense layer; 2 MoE layers x
    # (2 shared + 2 routed) x 3*8*6=144 = 1152; gates 2*4*8=64; lm_head 10*8=80
    assert token_macs(cfg, 1) == 2 * (256 + 20 * 1) + 1152 + 64 + 80 == 1848  # dense: no indexer scores
    assert token_macs(cfg, 2) == 2 * (256 + 20 * 2) + 1296  # at index_topk still dense
    assert token_macs(cfg, 10) == 2 * (256 + 20 * 2 + 10 * 10) + 1296 == 2088
    assert step_flops(cfg, 0, 10) == 0


def test_bounds():
    assert compute_step_s(2e9, 100.0) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="gflops"):
        compute_step_s(1.0, 0.0)
    with pytest.raises(ValueError, match="batch and context"):
        step_flops(ModelConfig.from_dict(V2), -1, 0)
