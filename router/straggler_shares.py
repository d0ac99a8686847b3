"""Stragglers get less: a slow expert node's share of each replicated expert is lowered (pure).

The leader's planner water-fills shares on routed-token counts; it cannot see that one node answers
slower than its peers (a noisy neighbour, a throttled CPU, a bad NIC). After each plan, the leader
multiplies a straggler's share of every expert it holds with a faster replica by :data:`SLOW_FACTOR` and
renormalizes (:func:`lower_straggler_shares`); who is a straggler comes from the attention nodes' hop
p99s (router/hop_status.py::stragglers). The next plan after the node recovers has the planner's shares
again, so it gets its full share back. Experts held only by stragglers keep their shares: the rows have
nowhere faster to go. Given the plan's routed-token counts, the record's stats also carry each node's load
under the lowered shares (``applied_loads``): ``moemesh status`` shows it beside the planned load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType

from moemesh.control.records import PlacementRecord

SLOW_FACTOR = 0.5  # half of what the plan gives it, in every plan made while it stays slow


def lower_straggler_shares(placement: PlacementRecord, slow: set[str], factor: float = SLOW_FACTOR,
                           loads: Mapping[int, Sequence[float]] | None = None) -> PlacementRecord:
    """``placement`` with the shares of the node ids in ``slow`` scaled by ``factor`` (then renormalized) on every
    expert that also has a replica on a node not in ``slow``; the same record when nothing changes.

    ``loads``: {MoE layer: routed tokens per expert}, the counts the plan was made on; when given, the stats
    get ``applied_loads``, each planned node's load per layer under the new shares."""
    if not slow:
        return placement
    shares, changed = {}, False
    for layer, experts in placement.layers.items():
        row = {}
        for expert, nodes in experts.items():
            share = placement.share_of(layer, expert)
            if any(n in slow for n in nodes) and not all(n in slow for n in nodes):
                scaled = [s * (factor if n in slow else 1.0) for n, s in zip(nodes, share)]
                total = sum(scaled)
                if total > 0:
                    share, changed = tuple(s / total for s in scaled), True
            row[expert] = tuple(share)
        shares[layer] = MappingProxyType(row)
    if not changed:
        return placement
    stats = placement.stats
    lowered = replace(placement, shares=MappingProxyType(shares))
    if stats is not None:
        note = f"stragglers given less: {', '.join(sorted(slow))}"
        stats = replace(stats, reason=f"{stats.reason}; {note}" if stats.reason else note)
        if loads is not None:
            stats = replace(stats, applied_loads=applied_loads(lowered, loads, stats.node_loads))
    return replace(lowered, stats=stats)


def applied_loads(placement: PlacementRecord, loads: Mapping[int, Sequence[float]],
                  planned: Mapping[str, Sequence[float]]) -> Mapping[str, tuple[float, ...]]:
    """Per node (those in ``planned``, in its order of layers: the placement's), the routed tokens its replicas
    take per layer under ``placement``'s shares, rounded as the planner rounds its own."""
    layers = sorted(placement.layers)
    out = {node: [0.0] * len(layers) for node in planned}
    for i, layer in enumerate(layers):
        row = loads.get(layer, ())
        for expert, nodes in placement.layers[layer].items():
            tokens = row[expert] if expert < len(row) else 0.0
            for node, share in zip(nodes, placement.share_of(layer, expert)):
                if node in out:
                    out[node][i] += tokens * share
    return MappingProxyType({node: tuple(round(v, 3) for v in per_layer) for node, per_layer in out.items()})
