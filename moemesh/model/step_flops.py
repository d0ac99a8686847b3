"""Arithmetic a decode step does, from the config (pure arithmetic, no torch): the compute roofline.

weight_bytes.py gives the bytes a step must read; this gives the multiply-adds it must do, so that
``moemesh bench`` can set the step against both ceilings: the bytes over the streaming bandwidth and the
FLOPs over the device's matmul rate. Which one binds moves with the batch: a weight read once serves every
row of the step, so bytes stay flat while FLOPs grow with the rows, and a step far above both floors says
which of its kernels to look at.

Per token, each weight of a matmul it passes through costs one multiply-add (2 FLOPs): every layer's MLA
projections (wkv_b as the absorbed attention uses it: the nope queries into the latent, the latent into the
values), the dense MLPs, the shared experts, the gate, the lm_head once, and ``num_experts_per_tok`` routed
experts per MoE layer. Attention over the cache adds, per head and cached token, the latent and rope scores
and the latent values; V3.2's indexer its projections and, once the context exceeds ``index_topk``, its
scores over the whole context, while the attention itself then reads ``index_topk`` tokens. Norms, rope,
softmax and the gate's top-k are left out (a few FLOPs per value of an activation, not per weight).
"""

from __future__ import annotations

from .config import ModelConfig
from .weight_bytes import indexer_params, mla_params


def _attention_weights(cfg: ModelConfig) -> int:
    """Matmul weights one token passes through in one layer's MLA (and V3.2's indexer): weight_bytes.py's
    parameter counts, less the norms."""
    projections, wkv_b, _ = mla_params(cfg)
    return projections + wkv_b + sum(indexer_params(cfg))


def _attention_over_cache(cfg: ModelConfig, context: float) -> float:
    """Multiply-adds of one token's attention over ``context`` cached tokens in one layer. V3.2's indexer scores
    the context (and weights its heads) only where it exceeds ``index_topk``: shorter, the model attends to all
    of it densely (attn_node/model.py ``sparse``)."""
    attended = min(context, cfg.index_topk) if cfg.has_indexer else context
    per_token = cfg.num_attention_heads * (cfg.kv_cache_dim + cfg.kv_lora_rank)  # scores, then values
    sparse = cfg.has_indexer and context > cfg.index_topk
    indexer = cfg.index_n_heads * (cfg.index_head_dim + 1) * context if sparse else 0  # scores, head weighting
    return per_token * attended + indexer


def token_macs(cfg: ModelConfig, context: float) -> float:
    """Multiply-adds of one decoded token through the whole model, with ``context`` tokens cached per layer."""
    d, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    moe = len(cfg.moe_layers)
    expert = 3 * d * cfg.moe_intermediate_size
    per_layer = _attention_weights(cfg) + _attention_over_cache(cfg, context)
    return (n_layers * per_layer
            + (n_layers - moe) * 3 * d * cfg.intermediate_size  # dense MLPs
            + moe * (cfg.n_shared_experts + cfg.num_experts_per_tok) * expert  # shared and routed experts
            + moe * cfg.n_routed_experts * d  # gates
            + cfg.vocab_size * d)  # lm_head


def step_flops(cfg: ModelConfig, batch: int, context: float) -> float:
    """FLOPs of a decode step of ``batch`` tokens, each with ``context`` tokens cached (2 per multiply-add)."""
    if batch < 0 or context < 0:
        raise ValueError(f"batch and context must be >= 0, got {batch} and {context}")
    return 2.0 * batch * token_macs(cfg, context)


def compute_step_s(flops: float, gflops: float) -> float:
    """The fastest a step of ``flops`` can run at ``gflops`` (GFLOP/s, 1e9) of matmul throughput."""
    if gflops <= 0:
        raise ValueError(f"gflops must be > 0, got {gflops}")
    return flops / (gflops * 1e9)
