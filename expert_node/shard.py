"""ExpertShard: any subset of DeepSeekMoE routed experts, computed in one grouped pass per layer.

Glossary: T rows, D hidden size, I moe_intermediate_size, K experts per token,
E_l experts this shard hosts in a layer, A = number of (row, expert) assignments
that land on this shard.

The shard stores each layer's experts stacked, ``w13`` = [E_l, 2I, D] (gate and
up projections fused) and ``w2`` = [E_l, D, I], plus a table from logical
expert id to local slot. For a batch it sorts the (row, expert) assignments it
hosts by slot and runs two grouped GEMMs over the contiguous segments, then
scatters the weighted results back onto the rows. There is no Python loop over
tokens. On CPUs, where torch's grouped GEMM is a serial loop over every expert,
``_pick_strategy`` chooses a padded batched matmul or a loop over busy experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class _LayerExperts:
    expert_ids: list[int]  # logical id of each local slot
    slot_of: torch.Tensor  # [E] int64, logical expert id -> local slot, -1 when not hosted
    w13: torch.Tensor  # [E_l, 2I, D]
    w2: torch.Tensor  # [E_l, D, I]

    @property
    def hosted(self) -> np.ndarray:
        return (self.slot_of >= 0).numpy()


def _grouped_mm(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """[A, in] x [E_l, in, out] over row segments ending at ``offs`` -> [A, out]."""
    if (x.shape[1] * x.element_size()) % 16 == 0 and (w_t.shape[2] * w_t.element_size()) % 16 == 0:
        return F.grouped_mm(x, w_t, offs=offs)
    # torch's grouped GEMM needs 16-byte aligned rows; odd sizes take one GEMM per expert segment.
    out = x.new_empty(x.shape[0], w_t.shape[2])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w_t[e]
        start = end
    return out


class ExpertShard:
    """Holds (layer, expert) SwiGLU experts and computes their weighted sum for routed rows."""

    STRATEGIES = ("auto", "grouped", "padded", "looped")

    def __init__(self, n_routed_experts: int, dtype: torch.dtype = torch.float32, strategy: str = "auto",
                 fused_moe: Callable | None = None, device: torch.device | str = "cpu"):
        if strategy not in self.STRATEGIES:
            raise ValueError(f"strategy must be one of {self.STRATEGIES}, got {strategy!r}")
        self.n_routed_experts = n_routed_experts
        self.fused_moe = fused_moe  # the Triton fused-MoE op (GPUs); None = the CPU strategies below
        self.dtype = dtype
        self.device = torch.device(device)  # where the weights live and the math runs
        self.strategy = strategy  # auto picks per batch; the others force a path (tests, benchmarks)
        self._layers: dict[int, _LayerExperts] = {}
        # strict: a routed expert this shard lacks is an error, not a zero contribution (the Dispatch service
        # validates first; this re-checks against the snapshot used, in case a drop ran in between)
        self.strict = False

    # ---- what is hosted -------------------------------------------------
    def hosted(self) -> dict[int, list[int]]:
        """layer id -> sorted logical expert ids held."""
        return {layer: sorted(le.expert_ids) for layer, le in self._layers.items()}

    def hosted_mask(self, layer_id: int) -> np.ndarray | None:
        """[E] bool, True for experts of ``layer_id`` held here; None when the layer has none."""
        le = self._layers.get(layer_id)
        return None if le is None else le.hosted

    def hosts(self, layer_id: int, expert_id: int) -> bool:
        le = self._layers.get(layer_id)
        return le is not None and 0 <= expert_id < self.n_routed_experts and bool(le.slot_of[expert_id] >= 0)

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
        # A new _LayerExperts replaces the old in one assignment: forward() reads a layer's snapshot once, so
        # loads and drops may run on another thread than the math (never two of them at once, though).
        expert_ids = sorted(weights)
        w13 = torch.stack([torch.cat([weights[e][0], weights[e][1]], dim=0) for e in expert_ids])
        w2 = torch.stack([weights[e][2] for e in expert_ids])
        slot_of = torch.full((self.n_routed_experts,), -1, dtype=torch.int64)
        slot_of[expert_ids] = torch.arange(len(expert_ids))
        self._layers[layer_id] = _LayerExperts(
            expert_ids=expert_ids,
            slot_of=slot_of,
            w13=w13.to(self.device, self.dtype).contiguous(),
            w2=w2.to(self.device, self.dtype).contiguous(),
        )

    @staticmethod
    def _check_hosted(layer_id: int, le: "_LayerExperts", topk_idx: torch.Tensor) -> None:
        flat = topk_idx.reshape(-1).long()
        lacking = (flat >= 0) & (le.slot_of[flat.clamp(min=0)] < 0)
        if bool(lacking.any()):
            missing = sorted(set(flat[lacking].tolist()))
            raise ValueError(f"layer {layer_id}: experts {missing[:8]} are not hosted here (dropped meanwhile?)")

    # ---- math -----------------------------------------------------------
    def forward(
        self,
        layer_id: int,
        x: torch.Tensor,  # [T, D]
        topk_idx: torch.Tensor,  # [T, K] logical expert ids, -1 = skip
        topk_weights: torch.Tensor,  # [T, K]
    ) -> torch.Tensor:
        """Per row, sum_k w_k * SwiGLU_k(x) over the row's experts that this shard hosts; [T, D].

        Rows whose experts all live elsewhere come back as zeros, so partial results
        from several shards simply add up.
        """
        out = torch.zeros_like(x)  # [T, D]
        le = self._layers.get(layer_id)
        if le is None and self.strict and bool((topk_idx >= 0).any()):
            raise ValueError(f"layer {layer_id} has no experts here (dropped meanwhile?)")
        if le is None or x.shape[0] == 0:
            return out
        if topk_idx.numel() and (int(topk_idx.min()) < -1 or int(topk_idx.max()) >= self.n_routed_experts):
            raise ValueError(f"routed expert ids must be in 0..{self.n_routed_experts - 1} (or -1 = skip)")
        if self.strict:
            self._check_hosted(layer_id, le, topk_idx)
        if self.fused_moe is not None:
            local = torch.where(topk_idx >= 0, le.slot_of[topk_idx.clamp(min=0).long()], -1)  # [T, K] slots
            return self.fused_moe(x.to(self.dtype), le.w13, le.w2, local, topk_weights.float()).to(x.dtype)
        top_k = topk_idx.shape[1]
        flat = topk_idx.reshape(-1).long()
        # -1 marks an assignment another node computes (a replica took it): skip it like a foreign expert.
        slots = torch.where(flat >= 0, le.slot_of[flat.clamp(min=0)], -1)  # [T*K], -1 where not ours
        hosted = (slots >= 0).nonzero().squeeze(1)  # [A] flat (row, k) positions we compute
        if hosted.numel() == 0:
            return out
        slots = slots[hosted]
        order = torch.argsort(slots, stable=True)
        hosted, slots = hosted[order], slots[order]  # grouped by local slot
        rows = hosted // top_k  # [A]
        counts = torch.bincount(slots, minlength=len(le.expert_ids))  # [E_l]
        xs = x[rows].to(self.dtype)  # [A, D]
        strategy = self.strategy if self.strategy != "auto" else _pick_strategy(counts, slots.numel(), x.is_cuda)
        if strategy == "padded":
            ys = _padded_swiglu(xs, slots, counts, le)
        elif strategy == "looped":
            ys = _looped_swiglu(xs, counts, le)
        else:
            ys = _grouped_swiglu(xs, counts.cumsum(0).to(torch.int32), le)
        ys = ys * topk_weights.reshape(-1)[hosted].unsqueeze(1).to(ys.dtype)  # [A, D]
        out.index_add_(0, rows, ys.to(out.dtype))
        return out


def _pick_strategy(counts: torch.Tensor, assignments: int, cuda: bool) -> str:
    """How to run this batch's experts; measured on CPU (see the closing notes of issue [A]).

    On GPUs the grouped GEMM is one kernel. On CPUs torch's grouped GEMM runs one GEMM per
    hosted expert, empty ones included, on one core: decode-sized batches touching most
    experts do better with one padded bmm over every hosted expert (memory-bound weight
    reads spread over all cores, at the price of reading idle experts and padding rows);
    batches touching few experts do better looping over just the busy ones.
    """
    if cuda:
        return "grouped"
    n_experts = counts.numel()
    busy = int((counts > 0).sum())
    if busy * 2 >= n_experts and int(counts.max()) * n_experts <= 4 * assignments + n_experts:
        return "padded"
    return "looped"


def _looped_swiglu(xs: torch.Tensor, counts: torch.Tensor, le: _LayerExperts) -> torch.Tensor:
    """One GEMM pair per busy expert over its contiguous row segment (a loop over experts, not rows)."""
    inter = le.w2.shape[-1]
    out = xs.new_empty(xs.shape[0], le.w2.shape[1])  # [A, D]
    start = 0
    for slot, n in enumerate(counts.tolist()):
        if n:
            gate_up = xs[start : start + n] @ le.w13[slot].t()  # [n, 2I]
            out[start : start + n] = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ le.w2[slot].t()
            start += n
    return out


def _grouped_swiglu(xs: torch.Tensor, offs: torch.Tensor, le: _LayerExperts) -> torch.Tensor:
    inter = le.w2.shape[-1]
    gate_up = _grouped_mm(xs, le.w13.transpose(1, 2), offs)  # [A, 2I]
    h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [A, I]
    return _grouped_mm(h, le.w2.transpose(1, 2), offs)  # [A, D]


def _padded_swiglu(xs: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor, le: _LayerExperts) -> torch.Tensor:
    """Rows laid out [E_l, M, D] (M = most rows of any expert, zeros elsewhere), two bmm's."""
    inter = le.w2.shape[-1]
    starts = counts.cumsum(0) - counts  # [E_l] first assignment of each slot (slots are sorted)
    rank = torch.arange(slots.numel()) - starts[slots]  # [A] row of each assignment within its expert
    padded = xs.new_zeros(counts.numel(), int(counts.max()), xs.shape[1])  # [E_l, M, D]
    padded[slots, rank] = xs
    gate_up = torch.bmm(padded, le.w13.transpose(1, 2))  # [E_l, M, 2I]
    h = F.silu(gate_up[..., :inter]) * gate_up[..., inter:]  # [E_l, M, I]
    return torch.bmm(h, le.w2.transpose(1, 2))[slots, rank]  # [A, D]
