"""DeepSeek-V2/V3/V3.2 on an attention node: everything except the routed experts.

One file, top to bottom: norms, rotary (YaRN), V3.2's lightning indexer, Multi-head Latent Attention,
the dense MLP, the MoE gate, the MoE layer (routed experts through an
:class:`~moemesh.expert_backend.ExpertBackend` attached from outside), the block and the model.
Weight names follow DeepSeek's reference (``wq_a``, ``wkv_a``, ``wkv_b``...);
:func:`hf_to_local_name` maps Hugging Face checkpoint names onto them.

Glossary of shape symbols:
    T  tokens in the step, all sequences flattened
    D  hidden_size                    H  num_attention_heads
    C  kv_lora_rank (latent)          R  qk_rope_head_dim
    N  qk_nope_head_dim               V  v_head_dim
    Lq q_lora_rank                    E  n_routed_experts
    K  num_experts_per_tok            I  intermediate size
    B  sequences in an attention group, Q queries per sequence, S context length
    Hi index_n_heads                  Di index_head_dim (V3.2's indexer)

The model is transport- and scheduler-agnostic: a step is a flat token batch
plus an :class:`AttnBatch` describing where each token sits in the paged
latent cache (built by the engine's runner).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.model.config import ModelConfig, yarn_get_mscale
from moemesh.expert_backend import ExpertBackend
from moemesh.kernels.ops import DenseOps, Ops, select_ops


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T with no bias (DeepSeek has none).

    ``dense.linear`` computes it (chosen for the device: on CPU the C kernel for decode-sized batches, which
    streams the weight once, also when it is kept bf16/fp16 under fp32 activations, widened exactly in registers).
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, dense: DenseOps):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype)
        self.dense = dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, dense: DenseOps):
        super().__init__()
        self.dense = dense
        self.eps = eps
        self.weight = _param(dim, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense.rms_norm(x, self.weight, self.eps)  # a fused call (one C call on CPU), or None
        if y is not None:
            return y
        # Normalise in fp32 as the reference does, then scale in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# ---- rotary embedding --------------------------------------------------


class Rotary(nn.Module):
    """RoPE on the R rope dims, with DeepSeek's YaRN frequency blend and mscale on cos/sin."""

    def __init__(self, cfg: ModelConfig, dense: DenseOps):
        super().__init__()
        self.dense = dense
        dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # [R/2]
        self.attention_factor = 1.0
        if cfg.yarn is not None:
            inv_freq, self.attention_factor = _yarn_inv_freq(cfg, inv_freq)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = cfg.rope_interleave

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, R/2]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              interleave: bool | None = None) -> torch.Tensor:
        """x: [T, ..., R]; cos/sin: [T, R/2]. Returns rotated x, halves laid out [x1', x2'].

        Interleaved checkpoints pair dims (0,1),(2,3)...; the others pair i with i+R/2.
        Only dot products of rotated vectors are used, so the output layout is free.
        ``interleave`` overrides the checkpoint's choice (V3.2's indexer always splits halves).
        """
        interleave = self.interleave if interleave is None else interleave
        out = self.dense.rope(x, cos, sin, interleave)  # a fused call (on CPU: the same bits as the ops below)
        if out is not None:
            return out
        if interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
        c, s = cos.view(shape), sin.view(shape)
        xf1, xf2 = x1.float(), x2.float()
        return torch.cat([xf1 * c - xf2 * s, xf2 * c + xf1 * s], dim=-1).to(x.dtype)


def _yarn_inv_freq(cfg: ModelConfig, inv_freq_extra: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Blend interpolated and extrapolated frequencies over YaRN's correction range."""
    y, dim, base = cfg.yarn, cfg.qk_rope_head_dim, cfg.rope_theta
    assert y is not None

    def correction_dim(rotations: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(y.beta_fast)), 0)
    high = min(math.ceil(correction_dim(y.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq_extra / y.factor) * (1 - extrapolation) + inv_freq_extra * extrapolation
    if y.attention_factor is not None:
        factor = y.attention_factor
    elif y.mscale and y.mscale_all_dim:
        factor = yarn_get_mscale(y.factor, y.mscale) / yarn_get_mscale(y.factor, y.mscale_all_dim)
    else:
        factor = yarn_get_mscale(y.factor)
    return inv_freq, float(factor)


# ---- attention ---------------------------------------------------------


@dataclass(frozen=True)
class AttnGroup:
    """Sequences attended together as one padded batch (B sequences, Q queries, S context)."""

    token_index: torch.Tensor  # [B, Q] int64 row of each query in the flat batch (padding -> any row)
    ctx_slots: torch.Tensor  # [B, S] int64 cache slot of each context position (padding -> a zeroed slot)
    mask: torch.Tensor  # [B, 1, Q, S] bool, True where query may attend key (causal, in range)
    absorbed: bool  # attend over the latent directly (decode) or expand K/V first (naive)
    block_tables: torch.Tensor  # [B, max_blocks] int64 (for the paged decode op)
    context_lens: torch.Tensor  # [B] int64 tokens of context per sequence, this step's included
    block_size: int


@dataclass(frozen=True)
class AttnBatch:
    """Where each token of a step sits: positions, cache slots to write, groups to attend."""

    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    groups: tuple[AttnGroup, ...]
    # [T] int64: each token's row in the groups' outputs, flattened [B * Q] and concatenated in group
    # order. Padding queries are never picked, so the attention output is one gather (no boolean mask,
    # whose data-dependent size would be a host sync on a GPU).
    out_rows: torch.Tensor


class Indexer(nn.Module):
    """V3.2's lightning indexer (DeepSeek Sparse Attention): scores past tokens; each query keeps its top-k.

    score[q, s] = sum_h w[q, h] * relu(q_idx[q, h] . k_idx[s] / sqrt(Di)), with w = weights_proj(x) / sqrt(Hi).
    Its one key per token (LayerNorm'd, half-split RoPE on the first R dims) is cached beside the latent:
    columns [C + R, C + R + Di) of the layer's paged cache row. Scoring runs in fp32, as transformers does
    (the Hadamard rotation and fp8 of DeepSeek's kernel preserve these dot products up to rounding).
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, ops: Ops):
        super().__init__()
        assert cfg.q_lora_rank is not None  # the config reader refuses V3.2 without it
        self.ops = ops
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.topk, self.key_offset = cfg.index_topk, cfg.kv_cache_dim
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, dtype, ops.dense)
        self.wk = Linear(cfg.hidden_size, self.head_dim, dtype, ops.dense)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6, dtype=dtype)
        self.k_norm.requires_grad_(False)
        # fp32, as transformers keeps it
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, torch.float32, ops.dense)

    def _rope(self, x: torch.Tensor, rotary: Rotary, cos, sin) -> torch.Tensor:
        R = self.rope_dim
        return torch.cat([rotary.apply(x[..., :R], cos, sin, interleave=False), x[..., R:]], dim=-1)

    def project_and_store(self, x, q_lat, rope, kv_cache, slot_mapping):
        """Write this step's keys into the cache; return (queries [T, Hi, Di], head weights [T, Hi] fp32)."""
        T = x.shape[0]
        rotary, cos, sin = rope
        q = self._rope(self.wq_b(q_lat).view(T, self.n_heads, self.head_dim), rotary, cos, sin)  # [T, Hi, Di]
        k = self._rope(self.k_norm(self.wk(x)), rotary, cos, sin)  # [T, Di]
        # The latent's store op writes any row width: the key is its "c_kv" with an empty rope part.
        self.ops.store_latent(kv_cache[:, self.key_offset:], k, k[:, :0], slot_mapping)
        w = F.linear(x.float(), self.weights_proj.weight) * self.n_heads**-0.5  # [T, Hi]
        return q, w

    def top_positions(self, q, w, kv_cache, g: AttnGroup) -> torch.Tensor:
        """[B, Q, topk] int64: each query's best context positions (masked ones rank last: -inf)."""
        keys = kv_cache[g.ctx_slots, self.key_offset:].float()  # [B, S, Di]
        qg, wg = q[g.token_index].float(), w[g.token_index]  # [B, Q, Hi, Di], [B, Q, Hi]
        scores = F.relu(torch.einsum("bqhd,bsd->bqhs", qg, keys) * self.head_dim**-0.5)  # [B, Q, Hi, S]
        index = torch.einsum("bqh,bqhs->bqs", wg, scores).masked_fill(~g.mask[:, 0], float("-inf"))  # [B, Q, S]
        return index.topk(self.topk, dim=-1).indices

    def sparse_mask(self, top: torch.Tensor, g: AttnGroup) -> torch.Tensor:
        """g.mask with only each query's top positions left: [B, 1, Q, S] bool."""
        keep = torch.zeros(g.mask.shape[0], g.mask.shape[2], g.mask.shape[3], dtype=torch.bool, device=top.device)
        return g.mask & keep.scatter(-1, top, True)[:, None]


class MLA(nn.Module):
    """Multi-head Latent Attention over a paged latent cache of [c_kv | k_pe] rows (C + R values)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, ops: Ops):
        super().__init__()
        self.ops = ops
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.kv_lora_rank = H, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, \
            cfg.v_head_dim
        self.q_lora_rank = cfg.q_lora_rank
        if cfg.q_lora_rank is None:
            self.wq = Linear(D, H * cfg.qk_head_dim, dtype, ops.dense)
        else:
            self.wq_a = Linear(D, cfg.q_lora_rank, dtype, ops.dense)
            self.q_norm = RMSNorm(cfg.q_lora_rank, 1e-6, dtype, ops.dense)
            self.wq_b = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, dtype, ops.dense)
        self.wkv_a = Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype, ops.dense)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, 1e-6, dtype, ops.dense)
        self.wkv_b = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), dtype, ops.dense)
        self.wo = Linear(H * cfg.v_head_dim, D, dtype, ops.dense)
        self.softmax_scale = cfg.softmax_scale
        self.latent_dim = cfg.kv_cache_dim
        self.indexer = Indexer(cfg, dtype, ops) if cfg.has_indexer else None

    def forward(
        self,
        x: torch.Tensor,  # [T, D]
        rope: tuple[Rotary, torch.Tensor, torch.Tensor],
        batch: AttnBatch,
        kv_cache: torch.Tensor,  # [slots, C + R] (V3.2: [slots, C + R + Di], the indexer's keys last)
    ) -> torch.Tensor:
        fused = self.ops.dense.mla_layer(self, x, rope, batch, kv_cache)  # a decode step in one call (C on CPU)
        if fused is not None:
            return fused  # [T, D]: the ops below, to the bit
        T, (rotary, cos, sin) = x.shape[0], rope
        H, N, R, C = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        if self.q_lora_rank is None:
            q = self.wq(x)
        else:
            q_lat = self.q_norm(self.wq_a(x))  # [T, Lq]
            q = self.wq_b(q_lat)
        q = q.view(T, H, N + R)
        q_nope, q_pe = q[..., :N], rotary.apply(q[..., N:], cos, sin)  # [T, H, N], [T, H, R]
        kv = self.wkv_a(x)  # [T, C + R]
        c_kv = self.kv_norm(kv[:, :C])  # [T, C]
        k_pe = rotary.apply(kv[:, C:], cos, sin)  # [T, R]
        latent = kv_cache if self.indexer is None else kv_cache[:, : self.latent_dim]  # a view, rows strided
        self.ops.store_latent(latent, c_kv, k_pe, batch.slot_mapping)
        if self.indexer is not None:
            q_idx, w_idx = self.indexer.project_and_store(x, q_lat, rope, kv_cache, batch.slot_mapping)

        outs = []
        for g in batch.groups:
            # index_select, not q_nope[g.token_index]: the same gather in one op instead of aten::index's several
            rows = g.token_index.reshape(-1)  # [B * Q]
            qn = q_nope.index_select(0, rows).view(*g.token_index.shape, H, N)  # [B, Q, H, N]
            qp = q_pe.index_select(0, rows).view(*g.token_index.shape, H, R)  # [B, Q, H, R]
            # Sparse only where some context can exceed top-k; S is a host-known shape, so no sync decides it.
            sparse = self.indexer is not None and g.ctx_slots.shape[1] > self.indexer.topk
            top = self.indexer.top_positions(q_idx, w_idx, kv_cache, g) if sparse else None  # [B, Q, topk]
            if g.absorbed and g.token_index.shape[1] == 1:  # sparse: reads only the top rows, costs topk not S
                o = self._decode(qn[:, 0], qp[:, 0], latent, g, top[:, 0] if sparse else None).unsqueeze(1)
            else:
                ctx = latent[g.ctx_slots].to(x.dtype)  # [B, S, C + R]
                attend = self._absorbed if g.absorbed else self._naive
                mask = self.indexer.sparse_mask(top, g) if sparse else g.mask
                o = attend(qn, qp, ctx[..., :C], ctx[..., C:], mask)  # [B, Q, H, V]
            outs.append(o.flatten(0, 1))  # [B * Q, H, V]
        out = (outs[0] if len(outs) == 1 else torch.cat(outs)).index_select(0, batch.out_rows)  # [T, H, V]
        return self.wo(out.reshape(T, H * self.v_head_dim))

    def _softmax(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = scores.float().masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Expand the latent into per-head K and V (cheaper for long query chunks)."""
        B, S = c_kv.shape[:2]
        H, N, V = self.n_heads, self.qk_nope_head_dim, self.v_head_dim
        kv = self.wkv_b(c_kv).view(B, S, H, N + V)  # [B, S, H, N + V]
        k_nope, v = kv[..., :N], kv[..., N:]
        scores = torch.einsum("bqhn,bshn->bhqs", q_nope, k_nope)
        scores = scores + torch.einsum("bqhr,bsr->bhqs", q_pe, k_pe)  # [B, H, Q, S]
        p = self._softmax(scores * self.softmax_scale, mask).to(v.dtype)
        return torch.einsum("bhqs,bshv->bqhv", p, v)  # [B, Q, H, V]

    def _decode(self, q_nope, q_pe, latent, g: AttnGroup, top=None):
        """One query per sequence, absorbed, straight off the paged cache: the MLA decode op, or with
        ``top`` [B, topk] (V3.2's selected positions) the sparse one over those rows only."""
        H, N = self.n_heads, self.qk_nope_head_dim
        wkv_b = self.wkv_b.weight.view(H, N + self.v_head_dim, self.kv_lora_rank)  # [H, N + V, C]
        if top is None:  # both absorptions and the attention in one fused call (C on CPU), where there is one
            o = self.ops.dense.mla_decode(q_nope, q_pe, wkv_b, latent, g.block_tables, g.context_lens,
                                          g.block_size, self.softmax_scale, g.ctx_slots.shape[1])
            if o is not None:
                return o.to(q_nope.dtype)
        q_c = torch.einsum("bhn,hnc->bhc", q_nope, wkv_b[:, :N])  # [B, H, C]
        if top is None:  # S, the longest context, is a host-known shape: the op need not read context_lens
            o_c = self.ops.mla_decode(q_c, q_pe, latent, g.block_tables, g.context_lens, g.block_size,
                                      self.softmax_scale, max_context_len=g.ctx_slots.shape[1])  # [B, H, C]
        else:
            o_c = self.ops.sparse_mla_decode(q_c, q_pe, latent, g.block_tables, g.context_lens, top,
                                             g.block_size, self.softmax_scale)  # [B, H, C]
        return torch.einsum("bhc,hvc->bhv", o_c.to(q_c.dtype), wkv_b[:, N:])  # [B, H, V]

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Fold W_UK into the query and W_UV into the output: attend over the C-dim latent."""
        H, N = self.n_heads, self.qk_nope_head_dim
        wkv_b = self.wkv_b.weight.view(H, N + self.v_head_dim, self.kv_lora_rank)  # [H, N + V, C]
        q_c = torch.einsum("bqhn,hnc->bqhc", q_nope, wkv_b[:, :N])  # [B, Q, H, C]
        scores = torch.einsum("bqhc,bsc->bhqs", q_c, c_kv)
        scores = scores + torch.einsum("bqhr,bsr->bhqs", q_pe, k_pe)  # [B, H, Q, S]
        p = self._softmax(scores * self.softmax_scale, mask).to(c_kv.dtype)
        o_c = torch.einsum("bhqs,bsc->bqhc", p, c_kv)  # [B, Q, H, C]
        return torch.einsum("bqhc,hvc->bqhv", o_c, wkv_b[:, N:])  # [B, Q, H, V]


# ---- feed-forward ------------------------------------------------------


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype, dense: DenseOps):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, dtype, dense)
        self.w2 = Linear(inter_dim, dim, dtype, dense)
        self.w3 = Linear(dim, inter_dim, dtype, dense)
        self.dense = dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense.swiglu(x, self.w1.weight, self.w3.weight, self.w2.weight)  # one C call on CPU


class Gate(nn.Module):
    """DeepSeekMoE router: scores (softmax|sigmoid), top-k selection (greedy|group_limited_greedy|noaux_tc).

    Runs in fp32 like the reference. Returns (topk_idx [T, K], topk_weights [T, K] fp32).
    """

    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        self.route, self.linear = ops.route, ops.dense.linear
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.topk_method, self.scoring_func = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = _param(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32)
        # noaux_tc's load-balancing bias shifts which experts are chosen, never their weights.
        self.bias = _param(cfg.n_routed_experts, dtype=torch.float32) if cfg.topk_method == "noaux_tc" else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xf = x.float()
        logits = self.linear(xf, self.weight)  # [T, E]
        # The selection math (scores, group masks, top-k, normalisation) is the routing op:
        # kernels/routing.py, route_ref in plain torch beside its Triton kernel.
        return self.route(
            logits, top_k=self.top_k, scoring_func=self.scoring_func, topk_method=self.topk_method,
            n_group=self.n_group, topk_group=self.topk_group, norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.route_scale, bias=self.bias,
        )


class MoE(nn.Module):
    """Gate + shared experts here; routed experts through the backend attached from outside.

    The model is built without one: wiring code sets ``backend`` (and, where the placement
    planner needs it, ``stats``) on every MoE layer (attn_node/attach.py: ``attach_experts``).
    """

    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype, ops: Ops):
        super().__init__()
        self.layer_id = layer_id
        self.gate = Gate(cfg, ops)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype, ops.dense)
            if cfg.n_shared_experts
            else None
        )
        self.backend: ExpertBackend | None = None
        self.stats = None  # optional LoadStats: routed tokens per expert, the placement planner's input

    def start(self, x: torch.Tensor):
        """Route and dispatch; compute the shared experts while the routed ones run elsewhere."""
        if self.backend is None:
            raise RuntimeError(f"MoE layer {self.layer_id} has no expert backend: attach one with attach_experts")
        topk_idx, topk_weights = self.gate(x)  # [T, K], [T, K]
        if self.stats is not None:
            self.stats.add(self.layer_id, topk_idx)
        handle = self.backend.dispatch(self.layer_id, x, topk_idx, topk_weights)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        return handle, shared

    def finish(self, pending) -> torch.Tensor:
        handle, shared = pending
        y = self.backend.combine(handle)  # [T, D]
        return y if shared is None else y + shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(x))


# ---- the model ---------------------------------------------------------


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype, ops: Ops):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, ops.dense)
        self.attn = MLA(cfg, dtype, ops)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, ops.dense)
        self.ffn = (
            MoE(cfg, layer_id, dtype, ops)
            if cfg.is_moe_layer(layer_id)
            else MLP(cfg.hidden_size, cfg.intermediate_size, dtype, ops.dense)
        )

    def steps(self, x, rope, batch: AttnBatch, kv_cache: torch.Tensor):
        """The block as a generator: it yields once while its routed experts are away.

        A driver can run other micro-batches' attention at that point (ping-pong);
        the value returned at StopIteration is the block's output.
        """
        x = x + self.attn(self.attn_norm(x), rope, batch, kv_cache)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            pending = self.ffn.start(h)
            yield
            return x + self.ffn.finish(pending)
        return x + self.ffn(h)


class Transformer(nn.Module):
    """Embeddings, blocks, final norm and head. ``forward`` returns hidden states; ``logits`` projects."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, ops: Ops | None = None,
                 device: torch.device | str = "cpu", compute_dtype: torch.dtype | None = None):
        """Every parameter is made on ``device`` (``meta``: shapes only, for a loader that assigns the
        checkpoint's tensors); ``ops`` default to :func:`select_ops` for that device.

        ``dtype``: the weights' dtype in memory. ``compute_dtype`` (default: ``dtype``): activations and the
        latent cache; when it differs (fp32 over bf16 weights on CPU) the small parameters that meet
        activations directly (norms, ``wkv_b`` in the absorbed einsums) are kept in it, and the projections,
        embedding and head stay in ``dtype``.
        """
        super().__init__()
        device = torch.device(device)
        ops = ops or select_ops(device)
        self.cfg = cfg
        self.compute_dtype = compute_dtype or dtype
        with device:  # the default device of every factory call below: no CPU copy on the way
            self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
            self.embed.weight.requires_grad_(False)
            self.layers = nn.ModuleList(Block(cfg, i, dtype, ops) for i in range(cfg.num_hidden_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, ops.dense)
            self.head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, dtype, ops.dense)
        if self.compute_dtype != dtype:
            for module in self.modules():
                if isinstance(module, (RMSNorm, nn.LayerNorm)):
                    module.to(self.compute_dtype)
            for layer in self.layers:
                layer.attn.wkv_b.to(self.compute_dtype)
        # Frequencies computed in fp32 on the host, as the reference does at init, then moved: the same bits
        # on every device (a buffer, not in the state dict: a loader building on meta makes it again).
        self.dense = ops.dense
        self.rotary = Rotary(cfg, ops.dense).to(device)

    @property
    def device(self) -> torch.device:
        """Where the weights live: the step's inputs, the latent cache and the sampler go there too."""
        return self.embed.weight.device

    def moe_layers(self) -> list[MoE]:
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        batch: AttnBatch,
        kv_caches: list[torch.Tensor],  # per layer [slots, cfg.cache_row_dim]
    ) -> torch.Tensor:
        return self.forward_micro_batches([(input_ids, batch)], kv_caches)[0]

    def forward_micro_batches(
        self,
        micro_batches: list[tuple[torch.Tensor, AttnBatch]],
        kv_caches: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """Run micro-batches through the layers in ping-pong (MegaScale-Infer's schedule).

        Each micro-batch advances until its next MoE layer has dispatched, then the next
        micro-batch runs; so micro-batch B's attention overlaps micro-batch A's routed
        experts on the expert nodes. One micro-batch is the plain sequential forward.
        """
        runs = [self._layers(ids, batch, kv_caches) for ids, batch in micro_batches]
        outputs: list[torch.Tensor | None] = [None] * len(runs)
        active = list(range(len(runs)))
        while active:
            for i in list(active):
                try:
                    next(runs[i])
                except StopIteration as done:
                    outputs[i] = done.value
                    active.remove(i)
        return outputs

    def _layers(self, input_ids: torch.Tensor, batch: AttnBatch, kv_caches: list[torch.Tensor]):
        x = self.embed(input_ids).to(self.compute_dtype)  # [T, D]
        cos, sin = self.rotary.cos_sin(batch.positions)  # [T, R/2]
        rope = (self.rotary, cos, sin)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = yield from layer.steps(x, rope, batch, kv_cache)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[T, D] final hidden states -> [T, vocab] fp32 logits."""
        weight = self.embed.weight if self.head is None else self.head.weight
        return self.dense.linear(h, weight).float()


# ---- checkpoint names --------------------------------------------------

_ATTN_NAMES = {
    "q_proj": "wq",
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
}
_MLP_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def hf_to_local_name(name: str) -> str | None:
    """Map a Hugging Face DeepSeek tensor name onto this module's state dict; None if not ours.

    Routed experts (``mlp.experts.*``) are not the attention node's and map to None.
    """
    if name == "model.embed_tokens.weight":
        return "embed.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return "head.weight"
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"]:
        return None
    layer, module, rest = parts[2], parts[3], parts[4:]
    prefix = f"layers.{layer}"
    if module == "input_layernorm":
        return f"{prefix}.attn_norm.{rest[-1]}"
    if module == "post_attention_layernorm":
        return f"{prefix}.ffn_norm.{rest[-1]}"
    if module == "self_attn" and rest[0] == "indexer" and len(rest) == 3:  # V3.2: same names as transformers'
        return f"{prefix}.attn.indexer.{rest[1]}.{rest[2]}"
    if module == "self_attn" and rest[0] in _ATTN_NAMES:
        return f"{prefix}.attn.{_ATTN_NAMES[rest[0]]}.{rest[-1]}"
    if module != "mlp":
        return None
    if rest[0] in _MLP_NAMES:
        return f"{prefix}.ffn.{_MLP_NAMES[rest[0]]}.weight"
    if rest[0] == "gate":
        return f"{prefix}.ffn.gate.{'bias' if rest[1] == 'e_score_correction_bias' else 'weight'}"
    if rest[0] == "shared_experts" and rest[1] in _MLP_NAMES:
        return f"{prefix}.ffn.shared_experts.{_MLP_NAMES[rest[1]]}.weight"
    return None
