"""Replicas' shares of their expert's tokens (pure): water-filling that minimises the most loaded node.

Vocabulary as in ``router/planner.py``; ``holders[e]`` are the nodes holding expert e, ascending.
"""

from __future__ import annotations

from typing import Sequence

Holders = tuple[tuple[int, ...], ...]

_SWEEPS = 2000  # water-filling sweeps at most; converges long before on realistic inputs


def _water_fill(base: Sequence[float], amount: float) -> list[float]:
    """Split ``amount`` over bins already filled to ``base`` so the fullest bin is as low as possible."""
    order = sorted(range(len(base)), key=lambda i: (base[i], i))
    level, total = 0.0, 0.0
    for k, i in enumerate(order, start=1):
        total += base[i]
        level = (amount + total) / k
        if k == len(order) or level <= base[order[k]]:
            break
    return [max(0.0, level - b) for b in base]


def _balance_shares(loads: Sequence[float], holders: Holders, n_nodes: int) -> list[list[float]]:
    """Shares per expert (aligned with holders[e]) that minimise the maximum node load."""
    part = [[load / len(nodes)] * len(nodes) for load, nodes in zip(loads, holders)]  # tokens per replica
    node_load = [0.0] * n_nodes
    for nodes, parts in zip(holders, part):
        for n, p in zip(nodes, parts):
            node_load[n] += p
    multi = sorted((e for e, nodes in enumerate(holders) if len(nodes) > 1 and loads[e] > 0),
                   key=lambda e: (-loads[e], e))
    tol = 1e-12 * max(sum(loads), 1e-300)
    for _ in range(_SWEEPS if multi else 0):
        change = 0.0
        for e in multi:
            nodes = holders[e]
            base = [node_load[n] - p for n, p in zip(nodes, part[e])]
            new = _water_fill(base, loads[e])
            for n, old, p in zip(nodes, part[e], new):
                node_load[n] += p - old
                change = max(change, abs(p - old))
            part[e] = new
        if change <= tol:
            break
    shares = []
    for load, parts in zip(loads, part):
        if load > 0:
            s = [p / load for p in parts]
            total = sum(s)
            shares.append([v / total for v in s])
        else:
            shares.append([1.0 / len(parts)] * len(parts))
    return shares


def evaluate(loads: Sequence[float], holders: Holders, n_nodes: int):
    """(shares aligned with ``holders``, node loads, balancedness) with the best shares for these holders."""
    shares = _balance_shares(loads, holders, n_nodes)
    node_load = [0.0] * n_nodes
    for load, nodes, s in zip(loads, holders, shares):
        for n, v in zip(nodes, s):
            node_load[n] += load * v
    peak = max(node_load)
    balancedness = (sum(node_load) / n_nodes) / peak if peak > 0 else 1.0
    return shares, node_load, balancedness
