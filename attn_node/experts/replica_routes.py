"""Which replica computes each (row, expert) assignment: rows split across replicas by the placement's shares.

Pure (no I/O): the gRPC and torch.distributed backends both route through it.

Each (row, expert) draws a point u in [0, 1) from a golden-ratio sequence that continues across calls
and goes to the replica whose cumulative-share interval holds u. Deterministic, and over any window
of rows each replica's count is within a few rows of its share, batch 1 included (a per-call
``row % replicas`` would send every batch-1 token to the first replica).
"""

from __future__ import annotations

import torch

from moemesh.expert_backend import ExpertBackendError
from moemesh.control.placement import Placement, describe_missing

_GOLDEN = 0.6180339887498949  # frac(golden ratio): successive multiples spread evenly over [0, 1)
_PLASTIC = 0.7548776662466927  # a second irrational step so experts do not draw in lockstep


class ExpertsUnavailable(ExpertBackendError):
    """No live replica hosts some routed experts; maps to gRPC UNAVAILABLE."""


class ReplicaRoutes:
    def __init__(self, moe_layers: tuple[int, ...], n_experts: int, placement: Placement):
        self.moe_layers, self.n_experts, self.placement = moe_layers, n_experts, placement
        # per layer: [E, W] live node ids (-1 pad), [E, W] cumulative shares (2.0 pad), [E] live counts
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._draws: dict[int, int] = {}  # rows assigned so far per layer: where the sequence continues
        self.rebuild(set(range(len(placement.nodes))))

    def rebuild(self, alive: set[int]) -> None:
        """Route only to nodes in ``alive``; a dead replica's share goes to the live ones in proportion."""
        for layer in self.moe_layers:
            live, cums = [], []
            for e in range(self.n_experts):
                key = (layer, e)
                pairs = [(n, s) for n, s in zip(self.placement.replicas.get(key, ()), self.placement.share_of(key))
                         if n in alive]
                total = sum(s for _, s in pairs)
                shares = [s / total if total > 0 else 1.0 / len(pairs) for _, s in pairs]
                live.append([n for n, _ in pairs])
                cums.append([sum(shares[: i + 1]) for i in range(len(shares))])
            width = max(1, max(len(r) for r in live))
            table = torch.full((self.n_experts, width), -1, dtype=torch.int64)
            cum = torch.full((self.n_experts, width), 2.0, dtype=torch.float64)
            for e, (nodes, c) in enumerate(zip(live, cums)):
                if nodes:
                    table[e, : len(nodes)] = torch.tensor(nodes, dtype=torch.int64)
                    cum[e, : len(c)] = torch.tensor(c, dtype=torch.float64)
                    cum[e, len(c) - 1] = 2.0  # rounding never leaves a gap at the top
            self._tables[layer] = (table, cum, torch.tensor([len(r) for r in live], dtype=torch.int64))

    def assign(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        """[T, K] expert ids (-1 = none) -> [T, K] node indices (-1 where idx is -1)."""
        table, cum, counts = self._tables[layer]
        safe = idx.clamp(min=0)
        n = counts[safe]  # [T, K]
        if bool(((n == 0) & (idx >= 0)).any()):
            lost = sorted(set(idx[(n == 0) & (idx >= 0)].tolist()))
            raise ExpertsUnavailable(f"no live expert node hosts {describe_missing({layer: lost})}")
        start = self._draws.get(layer, 0)
        self._draws[layer] = start + idx.shape[0]
        rows = torch.arange(start, start + idx.shape[0], dtype=torch.float64).unsqueeze(1)  # [T, 1]
        u = torch.frac(rows * _GOLDEN + safe.to(torch.float64) * _PLASTIC)  # [T, K]
        pick = (u.unsqueeze(-1) >= cum[safe]).sum(-1)  # [T, K] index of the replica whose interval holds u
        nodes = table[safe, pick]  # [T, K]
        return torch.where(idx >= 0, nodes, -1)
