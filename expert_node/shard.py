"""ExpertShard: any subset of DeepSeekMoE routed experts, computed in one grouped pass per layer.

Glossary: T rows, D hidden size, I moe_intermediate_size, K experts per token,
E_l experts this shard hosts in a layer, A = number of (row, expert) assignments
that land on this shard.

The shard stores each layer's experts stacked, ``w13`` = [E_l, 2I, D] (gate and
up projections fused) and ``w2`` = [E_l, D, I], plus a table from logical
expert id to local slot. For a batch it sorts the (row, expert) assignments it
hosts by slot and runs two grouped GEMMs over the contiguous segments, then
scatters the weighted results back onto the rows. There is no Python loop over
tokens or experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class _LayerExperts:
    expert_ids: list[int]  # logical id of each local slot
    slot_of: torch.Tensor  # [E] int64, logical expert id -> local slot, -1 when not hosted
    w13: torch.Tensor  # [E_l, 2I, D]
    w2: torch.Tensor  # [E_l, D, I]


def _grouped_mm(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """[A, in] x [E_l, in, out] over row segments ending at ``offs`` -> [A, out]."""
    return F.grouped_mm(x, w_t, offs=offs)


class ExpertShard:
    """Holds (layer, expert) SwiGLU experts and computes their weighted sum for routed rows."""

    def __init__(self, n_routed_experts: int, dtype: torch.dtype = torch.float32):
        self.n_routed_experts = n_routed_experts
        self.dtype = dtype
        self._layers: dict[int, _LayerExperts] = {}

    # ---- what is hosted -------------------------------------------------
    def hosted(self) -> dict[int, list[int]]:
        """layer id -> sorted logical expert ids held."""
        return {layer: sorted(le.expert_ids) for layer, le in self._layers.items()}

    def hosts(self, layer_id: int, expert_id: int) -> bool:
        le = self._layers.get(layer_id)
        return le is not None and bool(le.slot_of[expert_id] >= 0)

    def add_experts(
        self,
        layer_id: int,
        weights: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> None:
        """Add experts to a layer. ``weights``: expert id -> (gate [I, D], up [I, D], down [D, I])."""
        if not weights:
            return
        for e in weights:
            if not 0 <= e < self.n_routed_experts:
                raise ValueError(f"expert id {e} is outside 0..{self.n_routed_experts - 1}")
        kept = self._export(layer_id)
        kept.update(weights)
        self._rebuild(layer_id, kept)

    def drop_experts(self, layer_id: int, expert_ids: list[int]) -> None:
        kept = self._export(layer_id)
        for e in expert_ids:
            kept.pop(e, None)
        if kept:
            self._rebuild(layer_id, kept)
        else:
            self._layers.pop(layer_id, None)

    def _export(self, layer_id: int) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        le = self._layers.get(layer_id)
        if le is None:
            return {}
        inter = le.w2.shape[-1]
        return {
            e: (le.w13[s, :inter], le.w13[s, inter:], le.w2[s])
            for s, e in enumerate(le.expert_ids)
        }

    def _rebuild(self, layer_id: int, weights: dict[int, tuple[torch.Tensor, ...]]) -> None:
        expert_ids = sorted(weights)
        w13 = torch.stack([torch.cat([weights[e][0], weights[e][1]], dim=0) for e in expert_ids])
        w2 = torch.stack([weights[e][2] for e in expert_ids])
        slot_of = torch.full((self.n_routed_experts,), -1, dtype=torch.int64)
        slot_of[expert_ids] = torch.arange(len(expert_ids))
        self._layers[layer_id] = _LayerExperts(
            expert_ids=expert_ids,
            slot_of=slot_of,
            w13=w13.to(self.dtype).contiguous(),
            w2=w2.to(self.dtype).contiguous(),
        )

    # ---- math -----------------------------------------------------------
    def forward(
        self,
        layer_id: int,
        x: torch.Tensor,  # [T, D]
        topk_idx: torch.Tensor,  # [T, K] logical expert ids
        topk_weights: torch.Tensor,  # [T, K]
    ) -> torch.Tensor:
        """Per row, sum_k w_k * SwiGLU_k(x) over the row's experts that this shard hosts; [T, D].

        Rows whose experts all live elsewhere come back as zeros, so partial results
        from several shards simply add up.
        """
        out = torch.zeros_like(x)  # [T, D]
        le = self._layers.get(layer_id)
        if le is None or x.shape[0] == 0:
            return out
        top_k = topk_idx.shape[1]
        slots = le.slot_of[topk_idx.reshape(-1)]  # [T*K], -1 where not hosted
        hosted = (slots >= 0).nonzero().squeeze(1)  # [A] flat (row, k) positions we compute
        if hosted.numel() == 0:
            return out
        slots = slots[hosted]
        order = torch.argsort(slots, stable=True)
        hosted, slots = hosted[order], slots[order]  # grouped by local slot
        rows = hosted // top_k  # [A]
        offs = torch.bincount(slots, minlength=len(le.expert_ids)).cumsum(0).to(torch.int32)  # [E_l]
        xs = x[rows].to(self.dtype)  # [A, D]
        inter = le.w2.shape[-1]
        gate_up = _grouped_mm(xs, le.w13.transpose(1, 2), offs)  # [A, 2I]
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [A, I]
        ys = _grouped_mm(h, le.w2.transpose(1, 2), offs)  # [A, D]
        ys = ys * topk_weights.reshape(-1)[hosted].unsqueeze(1).to(ys.dtype)
        out.index_add_(0, rows, ys.to(out.dtype))
        return out
