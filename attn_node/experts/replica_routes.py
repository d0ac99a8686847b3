"""Which replica computes each (row, expert) assignment: rows split across replicas by the placement's shares.

Pure (no I/O): the gRPC and torch.distributed backends both route through it.

Each (row, expert) draws a point u in [0, 1) from a golden-ratio sequence that continues across calls
and goes to the replica whose cumulative-share interval holds u. Deterministic, and over any window
of rows each replica's count is within a few rows of its share, batch 1 included (a per-call
``row % replicas`` would send every batch-1 token to the first replica).
"""

from __future__ import annotations

import torch

from moemesh.errors import UnservableError
from moemesh.expert_backend import ExpertBackendError
from moemesh.control.placement import Placement, describe_missing

_GOLDEN = 0.6180339887498949  # frac(golden ratio): successive multiples spread evenly over [0, 1)
_PLASTIC = 0.7548776662466927  # a second irrational step so experts do not draw in lockstep


class ExpertsUnavailable(ExpertBackendError):
    """No live replica hosts some routed experts; maps to gRPC UNAVAILABLE."""


class ExpertsUnservable(ExpertsUnavailable, UnservableError):
    """No live replica hosts some routed experts and no placement over the live expert nodes could: UNAVAILABLE
    with gRPC's "do not retry" pushback (moemesh.control.servability)."""


class ReplicaRoutes:
    """Routing tables of one placement on the model's device; ``assign`` is device ops only (no host read)."""

    def __init__(self, moe_layers: tuple[int, ...], n_experts: int, placement: Placement,
                 device: torch.device | str = "cpu"):
        self.moe_layers, self.n_experts, self.placement = moe_layers, n_experts, placement
        self.device = torch.device(device)
        # per layer: [E, W] live node ids (-1 pad), [E, W] cumulative shares (2.0 pad), [E] live counts
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._nodes: dict[int, tuple[int, ...]] = {}  # per layer: live nodes it can route to (host side)
        self._node_ids: dict[int, torch.Tensor] = {}  # the same, [M] on the device
        self._lost: dict[int, bool] = {}  # per layer: some expert has no live replica (host side)
        self._draws: dict[int, int] = {}  # rows assigned so far per layer: where the sequence continues
        self.rebuild(set(range(len(placement.nodes))))

    def rebuild(self, alive: set[int]) -> None:
        """Route only to nodes in ``alive``; a dead replica's share goes to the live ones in proportion.

        The tables are built as Python lists and uploaded once per layer (a rebuild follows a node loss or a
        re-plan, never a step)."""
        for layer in self.moe_layers:
            live, cums = [], []
            for e in range(self.n_experts):
                key = (layer, e)
                pairs = [(n, s) for n, s in zip(self.placement.replicas.get(key, ()), self.placement.share_of(key))
                         if n in alive]
                total = sum(s for _, s in pairs)
                shares = [s / total if total > 0 else 1.0 / len(pairs) for _, s in pairs]
                live.append([n for n, _ in pairs])
                cum = [sum(shares[: i + 1]) for i in range(len(shares))]
                if cum:
                    cum[-1] = 2.0  # rounding never leaves a gap at the top
                cums.append(cum)
            width = max(1, max(len(r) for r in live))
            table = [nodes + [-1] * (width - len(nodes)) for nodes in live]
            cum = [c + [2.0] * (width - len(c)) for c in cums]
            dev = self.device
            self._tables[layer] = (torch.tensor(table, dtype=torch.int64, device=dev),
                                   torch.tensor(cum, dtype=torch.float64, device=dev),
                                   torch.tensor([len(r) for r in live], dtype=torch.int64, device=dev))
            self._nodes[layer] = tuple(sorted({n for nodes in live for n in nodes}))
            self._node_ids[layer] = torch.tensor(self._nodes[layer], dtype=torch.int64, device=dev)
            self._lost[layer] = any(not nodes for nodes in live)

    def nodes_of(self, layer: int) -> tuple[int, ...]:
        """The live nodes ``assign`` can return for ``layer``, known on the host without reading the routing."""
        return self._nodes[layer]

    def node_ids(self, layer: int) -> torch.Tensor:
        """``nodes_of(layer)`` as a [M] tensor on the device."""
        return self._node_ids[layer]

    def assign(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        """[T, K] expert ids (-1 = none) -> [T, K] node indices (-1 where idx is -1), on idx's device."""
        table, cum, counts = self._tables[layer]
        safe = idx.clamp(min=0)
        flat = safe.reshape(-1)  # [T*K]
        if self._lost[layer]:
            # Degraded only (an expert of this layer has no live replica): whether this batch routes to one
            # is data, so this is the one host read of assign, and it never happens on a healthy mesh.
            missing = (counts.index_select(0, flat).view_as(idx) == 0) & (idx >= 0)  # [T, K]
            if bool(missing.any()):
                lost = sorted(set(idx[missing].tolist()))
                raise ExpertsUnavailable(f"no live expert node hosts {describe_missing({layer: lost})}")
        start = self._draws.get(layer, 0)
        self._draws[layer] = start + idx.shape[0]
        rows = torch.arange(start, start + idx.shape[0], dtype=torch.float64, device=idx.device).unsqueeze(1)  # [T, 1]
        u = torch.frac(rows * _GOLDEN + safe.to(torch.float64) * _PLASTIC)  # [T, K]
        # index_select over flattened tables (not table[safe, pick]): gathers of a static shape
        width = table.shape[1]
        pick = (u.unsqueeze(-1) >= cum.index_select(0, flat).view(*idx.shape, width)).sum(-1)  # [T, K] replica slot
        nodes = table.reshape(-1).index_select(0, (safe * width + pick).reshape(-1)).view_as(idx)  # [T, K]
        return torch.where(idx >= 0, nodes, -1)
