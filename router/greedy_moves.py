"""Greedy re-placement (pure): the fallback when the exact minimal-move program finds no plan in its time limit.

One move at a time, each taken off the most loaded node: one of its hottest experts gains a replica on one of
the least loaded nodes (into a free slot, in place of a spare replica of another expert, or swapping places with
a single-replica expert of that node), whichever lowers the peak most once shares are re-balanced. It stops at
the target, or when no move lowers the peak. No optimality bound: it only stands in for the exact program on
layers too large for it, and the caller compares it with a fresh plan.
"""

from __future__ import annotations

from collections.abc import Sequence

from .shares import Holders, evaluate
from .zones import spans_zones

TRIED = 3  # hottest experts of the peak node x least loaded nodes tried per move
OPTIONS = 2  # replicas to drop, or experts to swap with, tried on each of those nodes


def _options(holders: list[list[int]], e: int, m: int, n: int, slots: int, floor: int):
    """Ways to put expert e (on node m) onto node n: (new holders, moves)."""
    on_n = [f for f, nodes in enumerate(holders) if n in nodes]
    if len(on_n) < slots:
        yield _with(holders, (e, n, None)), 1
    spare = [f for f in on_n if len(holders[f]) > max(floor, 1)]
    for f in sorted(spare, key=lambda f: (len(holders[f]), f), reverse=True)[:OPTIONS]:
        yield _with(holders, (e, n, None), (f, None, n)), 1
    singles = [f for f in on_n if len(holders[f]) == 1 and m not in holders[f]]
    for f in singles[:OPTIONS]:
        yield _with(holders, (e, n, m), (f, m, n)), 2


def _with(holders: list[list[int]], *changes: tuple[int, int | None, int | None]) -> list[list[int]]:
    """Copy with each (expert, node to add or None, node to drop or None) applied."""
    out = [list(nodes) for nodes in holders]
    for e, add, drop in changes:
        if drop is not None:
            out[e].remove(drop)
        if add is not None:
            out[e].append(add)
        out[e].sort()
    return out


def greedy_holders(loads: Sequence[float], previous: Holders, n_nodes: int, slots_per_node: int, floor: int,
                   target: float, max_moves: int, zone_of: Sequence[int] | None = None) -> Holders | None:
    """Holders reaching ``target`` by greedy moves from ``previous`` (module docstring); None when it cannot
    (within ``max_moves``, or the previous placement is below the floor or the zone rule for ``zone_of``: then
    only a fresh plan helps). Moves never break the zone rule."""
    if any(len(nodes) < floor or not spans_zones(nodes, zone_of) for nodes in previous):
        return None
    holders = [list(nodes) for nodes in previous]
    moves = 0
    shares, node_load, balance = evaluate(loads, tuple(map(tuple, holders)), n_nodes)
    while balance < target:
        peak = max(range(n_nodes), key=lambda n: (node_load[n], -n))
        flow_on_peak = {e: loads[e] * s for e, nodes in enumerate(holders) for n, s in zip(nodes, shares[e])
                        if n == peak}
        hottest = sorted(flow_on_peak, key=lambda e: (-flow_on_peak[e], e))[:TRIED]
        best = None
        for e in hottest:
            coolest = sorted((n for n in range(n_nodes) if n not in holders[e]), key=lambda n: (node_load[n], n))
            for n in coolest[:TRIED]:
                for candidate, cost in _options(holders, e, peak, n, slots_per_node, floor):
                    if not all(spans_zones(nodes, zone_of) for nodes in candidate):
                        continue
                    result = evaluate(loads, tuple(map(tuple, candidate)), n_nodes)
                    key = (max(result[1]), cost)
                    if best is None or key < best[0]:
                        best = (key, candidate, cost, result)
        if best is None or best[0][0] >= node_load[peak] * (1 - 1e-12) or moves + best[2] > max_moves:
            return None
        _, holders, cost, (shares, node_load, balance) = best
        moves += cost
    return tuple(tuple(nodes) for nodes in holders)
