"""Stragglers get less: a slow expert node's share of each replicated expert is lowered (pure).

The leader's planner water-fills shares on routed-token counts; it cannot see that one node answers
slower than its peers (a noisy neighbour, a throttled CPU, a bad NIC). After each plan, the leader
multiplies a straggler's share of every expert it holds with a faster replica by :data:`SLOW_FACTOR` and
renormalizes (:func:`lower_straggler_shares`); who is a straggler comes from the attention nodes' hop
p99s (router/hop_status.py::stragglers). The next plan after the node recovers has the planner's shares
again, so it gets its full share back. Experts held only by stragglers keep their shares: the rows have
nowhere faster to go.
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from moemesh.control.records import PlacementRecord

SLOW_FACTOR = 0.5  # half of what the plan gives it, in every plan made while it stays slow


def lower_straggler_shares(placement: PlacementRecord, slow: set[str], factor: float = SLOW_FACTOR
                           ) -> PlacementRecord:
    """``placement`` with the shares of the node ids in ``slow`` scaled by ``factor`` (then renormalized) on every
    expert that also has a replica on a node not in ``slow``; the same record when nothing changes."""
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
    if stats is not None:
        note = f"stragglers given less: {', '.join(sorted(slow))}"
        stats = replace(stats, reason=f"{stats.reason}; {note}" if stats.reason else note)
    return replace(placement, shares=MappingProxyType(shares), stats=stats)
