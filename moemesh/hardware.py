"""Hardware presets for the cluster model (pure): a roofline :class:`~moemesh.cluster_model.Profile` built from
published figures, one GPU per attention or expert node. Sources and caveats: docs/cluster-model.md.

Per MoE layer, with FP8 weights (1 byte per parameter) and a BF16 latent cache (2 bytes per value):

* attention, batch b, context c: the attention node reads its layer weights once and the cache of b x c tokens:
  max(bytes / (HBM x MLA_BW_EFF), FLOPs / (peak x efficiency)) + a launch floor, where FLOPs are the
  projections (2 x params x b) and absorbed MLA (2 x b x c x heads x (2 C + R));
* experts, A assignments over H hosted experts: the distinct experts hit, E[hit] = H (1 - (1 - 1/H)^A), read
  their weights, and compute 2 x 3 x hidden x inter x A FLOPs;
* hop: a fixed latency plus the bytes to every destination over the NIC (FP8 out, BF16 back).
"""

from __future__ import annotations

from dataclasses import dataclass

import math

from .cluster_model import ClusterShape, ModelError, ModelShape


@dataclass(frozen=True)
class Hardware:
    name: str
    hbm_tb_s: float  # HBM bandwidth, TB/s
    fp8_tflops: float  # dense FP8 tensor-core peak
    bf16_tflops: float  # dense BF16 tensor-core peak
    nic_gb_s: float  # per-GPU scale-out bandwidth achieved by DeepEP-style kernels, GB/s
    hbm_gb: float  # memory per GPU: what a node's weights and latent cache must fit in (90% of it)
    hop_latency_us: float = 20.0  # fixed cost of one dispatch + combine round trip (an assumption)
    gemm_eff: float = 0.6  # fraction of FP8 peak the grouped GEMMs reach (DeepGEMM: ~1350 of 1979 on H800)
    mla_bw_eff: float = 3000 / 3350  # FlashMLA: 3000 GB/s memory-bound of H800's 3350
    mla_flops_eff: float = 580 / 989  # FlashMLA: 580 TFLOPS compute-bound of H800's 989 BF16
    launch_us: float = 5.0  # per layer and per kernel group: the floor of a tiny step


PRESETS = {
    "H800": Hardware("H800", hbm_tb_s=3.35, fp8_tflops=1979, bf16_tflops=989, nic_gb_s=45, hbm_gb=80),
    "H200": Hardware("H200", hbm_tb_s=4.8, fp8_tflops=1979, bf16_tflops=989, nic_gb_s=45, hbm_gb=141),
    "B200": Hardware("B200", hbm_tb_s=8.0, fp8_tflops=4500, bf16_tflops=2250, nic_gb_s=45, hbm_gb=180),
}


@dataclass(frozen=True)
class LayerDims:
    """Per-layer sizes of a DeepSeek-V2/V3 config (parameters, not bytes)."""

    hidden: int
    heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head: int
    moe_inter: int
    n_shared: int
    n_experts: int

    @classmethod
    def from_config(cls, cfg) -> "LayerDims":
        return cls(cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank,
                   cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.moe_intermediate_size,
                   cfg.n_shared_experts, cfg.n_routed_experts)

    @property
    def attention_params(self) -> int:
        """MLA projections + shared experts + gate: what an attention node reads per MoE layer."""
        d, h, qk = self.hidden, self.heads, self.qk_nope + self.qk_rope
        q = h * qk * d if self.q_lora_rank is None else d * self.q_lora_rank + self.q_lora_rank * h * qk
        kv = d * (self.kv_lora_rank + self.qk_rope) + self.kv_lora_rank * h * (self.qk_nope + self.v_head)
        out = h * self.v_head * d
        return q + kv + out + 3 * d * self.moe_inter * self.n_shared + d * self.n_experts

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_inter


@dataclass(frozen=True)
class RooflineProfile:
    hw: Hardware
    dims: LayerDims
    hop_busy: float = 0.0  # RDMA from the GPU (DeepEP's hook-based overlap): no attention time per message

    def attn_us(self, batch: float, context: float) -> float:
        d, hw = self.dims, self.hw
        cache_bytes = batch * context * (d.kv_lora_rank + d.qk_rope) * 2
        weight_bytes = d.attention_params  # FP8
        mem_us = weight_bytes / (hw.hbm_tb_s * 1e6) + cache_bytes / (hw.hbm_tb_s * hw.mla_bw_eff * 1e6)
        proj_us = 2 * d.attention_params * batch / (hw.fp8_tflops * hw.gemm_eff * 1e6)
        mla_us = 2 * batch * context * d.heads * (2 * d.kv_lora_rank + d.qk_rope) / (hw.bf16_tflops
                                                                                     * hw.mla_flops_eff * 1e6)
        return max(mem_us, proj_us + mla_us) + hw.launch_us

    def expert_us(self, assignments: float, hosted: float) -> float:
        d, hw = self.dims, self.hw
        hit = hosted * (1 - (1 - 1 / hosted) ** assignments) if hosted >= 1 else 0.0
        mem_us = hit * d.expert_params / (hw.hbm_tb_s * 1e6)
        flop_us = 2 * d.expert_params * assignments / (hw.fp8_tflops * hw.gemm_eff * 1e6)
        return max(mem_us, flop_us) + hw.launch_us

    def hop_us(self, nbytes: float, destinations: float, nodes: int) -> float:
        return self.hw.hop_latency_us + nbytes * destinations / (self.hw.nic_gb_s * 1e3)

    def overhead_us(self, batch: float) -> float:
        return 0.0

    def misfit(self, model: ModelShape, shape: ClusterShape) -> str | None:
        """Why ``shape`` does not fit in memory (FP8 weights, BF16 cache, 10% headroom), or None."""
        budget = 0.9 * self.hw.hbm_gb * 1e9
        hosted = math.ceil(model.n_experts / shape.expert_nodes)
        expert_bytes = hosted * model.n_moe_layers * self.dims.expert_params
        if expert_bytes > budget:
            return f"{hosted} experts x {model.n_moe_layers} layers need {expert_bytes / 1e9:.0f} GB per expert node"
        d = self.dims
        attn_bytes = (model.n_layers * d.attention_params
                      + shape.batch * shape.context * (d.kv_lora_rank + d.qk_rope) * 2 * model.n_layers)
        if attn_bytes > budget:
            return f"attention weights and a cache of {shape.batch} x {shape.context} tokens need " \
                   f"{attn_bytes / 1e9:.0f} GB per attention node"
        return None


def preset(name: str, cfg) -> tuple[RooflineProfile, ModelShape]:
    """The preset ``name`` for the model ``cfg`` (a ModelConfig), and the model's shape on that wire (FP8 out,
    BF16 back: 1.5 bytes per value each way on average)."""
    hw = PRESETS.get(name.upper())
    if hw is None:
        raise ModelError(f"unknown hardware preset {name!r}: one of {', '.join(PRESETS)}")
    shape = ModelShape(cfg.num_hidden_layers, len(cfg.moe_layers), cfg.hidden_size, cfg.num_experts_per_tok,
                       cfg.n_routed_experts, act_bytes=1.5)
    return RooflineProfile(hw, LayerDims.from_config(cfg)), shape
