"""Weight bytes a decode step reads, from the config and the dtype in memory (pure arithmetic, no torch).

A decode step streams every weight it uses once per forward pass: each layer's attention (MLA projections,
V3.2's indexer), the norms, the dense MLPs, the MoE gates and shared experts, the lm_head, and of the routed
experts only those the step's tokens were routed to. On a memory-bound machine (CPUs, small batches on GPUs)
the step cannot be faster than those bytes over the memory's streaming bandwidth: the bandwidth roofline
that ``moemesh bench`` reports against. The embedding is left out: a step reads T of its rows, not the table.

The sizes follow the model exactly as moemesh holds it (attn_node/model.py, expert_node/shard.py): the gate
(and noaux_tc's bias) and the indexer's ``weights_proj`` are always fp32; the norms and wkv_b in the compute
(activations') dtype; everything else in the weights' dtype, except routed experts of an FP8 checkpoint kept e4m3, which take 1 byte per weight plus one fp32 scale
per (bn, bk) block, with the intermediate size padded to whole bn blocks (ExpertShard's layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ModelConfig

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4


def element_bytes(dtype: str) -> int:
    """Bytes per value of a compute dtype named as in config.json / ``--dtype`` (``float32``, ``bfloat16``...)."""
    try:
        return ELEMENT_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(ELEMENT_BYTES)}, got {dtype!r}") from None


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of each part of the model's weights, one copy; ``expert`` is one routed expert of one layer."""

    attention: int  # every layer's MLA projections and their q/kv norms, plus V3.2's indexer
    norms: int  # every layer's attn_norm and ffn_norm, and the final norm
    dense_mlp: int  # the dense layers' MLPs (first_k_dense_replace, and layers moe_layer_freq skips)
    shared_experts: int  # every MoE layer's shared experts
    gates: int  # every MoE layer's router weights (and noaux_tc's correction bias), fp32
    lm_head: int  # the output projection (the embedding itself when tied: the whole table is read)
    expert: int  # one routed expert (gate, up and down projections; FP8: with its block scales)
    moe_layers: int
    experts_per_layer: int

    @property
    def dense(self) -> int:
        """What every forward pass reads whatever the routing: all but the routed experts."""
        return self.attention + self.norms + self.dense_mlp + self.shared_experts + self.gates + self.lm_head

    @property
    def routed(self) -> int:
        """Every routed expert of every MoE layer: what a pool of expert nodes holds in all."""
        return self.expert * self.experts_per_layer * self.moe_layers

    def step_bytes(self, experts_hit: float, passes: float = 1.0) -> float:
        """Bytes one step reads: ``experts_hit`` (layer, expert) pairs summed over the MoE layers, and the
        dense weights once per forward pass (``passes``: micro-batches re-read them)."""
        return self.dense * passes + self.expert * experts_hit


def mla_params(cfg: ModelConfig) -> tuple[int, int, int]:
    """One layer's MLA values: (projections in the weights' dtype: wq or wq_a and wq_b, wkv_a, wo; wkv_b; the
    norms q_norm and kv_norm). The model holds wkv_b and the norms in the activations' dtype: the absorbed
    attention multiplies by wkv_b directly."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q, q_norm = d * h * cfg.qk_head_dim, 0  # wq
    else:
        q, q_norm = d * cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim, cfg.q_lora_rank  # wq_a, wq_b
    wkv_b = cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + d * cfg.kv_cache_dim + h * cfg.v_head_dim * d, wkv_b, q_norm + cfg.kv_lora_rank  # + wkv_a, wo


def indexer_params(cfg: ModelConfig) -> tuple[int, int]:
    """V3.2's lightning indexer per layer, its matmul values: (wq_b and wk, in the weights' dtype; weights_proj,
    fp32); (0, 0) without one. Its k_norm (weight and bias) is 2 x index_head_dim more."""
    if not cfg.has_indexer:
        return 0, 0
    assert cfg.q_lora_rank is not None  # the config reader refuses V3.2 without it
    di = cfg.index_head_dim
    return cfg.q_lora_rank * cfg.index_n_heads * di + cfg.hidden_size * di, cfg.hidden_size * cfg.index_n_heads


def _indexer_bytes(cfg: ModelConfig, elem: int, compute_elem: int) -> int:
    """V3.2's lightning indexer per layer: wq_b and wk in the dtype, k_norm (weight and bias, a norm) in the
    compute dtype, weights_proj fp32."""
    if not cfg.has_indexer:
        return 0
    in_dtype, weights_proj = indexer_params(cfg)
    return in_dtype * elem + 2 * cfg.index_head_dim * compute_elem + weights_proj * FP32


def expert_bytes(cfg: ModelConfig, elem: int, fp8_block: tuple[int, int] | None = None) -> int:
    """One routed expert: 3 x hidden x moe_intermediate values; FP8 kept: e4m3 bytes plus fp32 block scales
    in ExpertShard's layout (w13 [2I', D], w2 [D, I'], I' = I padded to whole bn blocks)."""
    d, inter = cfg.hidden_size, cfg.moe_intermediate_size
    if fp8_block is None:
        return 3 * d * inter * elem
    bn, bk = fp8_block
    padded = math.ceil(inter / bn) * bn
    scales = math.ceil(2 * padded / bn) * math.ceil(d / bk) + math.ceil(d / bn) * math.ceil(padded / bk)
    return 3 * d * padded + scales * FP32


def weight_bytes(cfg: ModelConfig, dtype: str, fp8_block: tuple[int, int] | None = None,
                 compute: str | None = None) -> WeightBytes:
    """The parts of ``cfg``'s weights in ``dtype``; ``fp8_block``: routed experts kept e4m3 in those blocks;
    ``compute`` (default ``dtype``): the activations' dtype, which the norms and wkv_b are held in (float32 on
    CPU over bf16 weights: moemesh/devices.py ``compute_dtype``)."""
    elem, compute_elem = element_bytes(dtype), element_bytes(compute or dtype)
    mla_weights, wkv_b, mla_norms = mla_params(cfg)
    mla_compute = wkv_b + mla_norms
    d, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    moe = len(cfg.moe_layers)
    dense_layers = n_layers - moe
    gate = cfg.n_routed_experts * d + (cfg.n_routed_experts if cfg.topk_method == "noaux_tc" else 0)
    return WeightBytes(
        attention=n_layers * (mla_weights * elem + mla_compute * compute_elem + _indexer_bytes(cfg, elem, compute_elem)),
        norms=(2 * n_layers + 1) * d * compute_elem,
        dense_mlp=dense_layers * 3 * d * cfg.intermediate_size * elem,
        shared_experts=moe * 3 * d * cfg.moe_intermediate_size * cfg.n_shared_experts * elem,
        gates=moe * gate * FP32,
        lm_head=cfg.vocab_size * d * elem,
        expert=expert_bytes(cfg, elem, fp8_block),
        moe_layers=moe,
        experts_per_layer=cfg.n_routed_experts,
    )


def roofline_step_s(step_bytes: float, stream_gbps: float) -> float:
    """The fastest a step reading ``step_bytes`` can run at ``stream_gbps`` (GB/s, 1e9 bytes) of streaming reads."""
    if stream_gbps <= 0:
        raise ValueError(f"stream_gbps must be > 0, got {stream_gbps}")
    return step_bytes / (stream_gbps * 1e9)


def roofline_fraction(step_bytes: float, steps_per_s: float, stream_gbps: float) -> float:
    """Weight bytes per second achieved over the streaming bandwidth: 1.0 = at the bandwidth roofline."""
    return steps_per_s * roofline_step_s(step_bytes, stream_gbps)
