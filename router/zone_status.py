"""Failure domains in ClusterStatus: the zones whose loss would leave experts of the stored placement unhosted.

The planner warns when it writes a placement (``router/zones.py::zone_warnings``, logged by the leader); any
router replica answers ClusterStatus, so each recomputes the same check from what every replica has: the stored
placement and the live expert nodes' zones (their records). Replicas on nodes that are gone are left out, so
after a zone is lost the check is over the zones that remain; experts with no live replica at all are
ClusterStatus's ``missing_experts``, not a zone's exposure.
"""

from __future__ import annotations

from collections.abc import Sequence

from moemesh.control.placement import default_expert_slots
from moemesh.control.records import NodeRecord, PlacementRecord
from moemesh.control.servability import min_slots

from .placement_state import previous_holders
from .zones import zone_index, zone_warnings


def n_experts_of(placement: PlacementRecord, experts: Sequence[NodeRecord]) -> int:
    """Routed experts per MoE layer: what the expert nodes publish, else what the placement names."""
    published = [r.capacity.n_routed_experts for r in experts
                 if r.capacity is not None and r.capacity.n_routed_experts is not None]
    if published:
        return max(published)
    return 1 + max((e for layer in placement.layers.values() for e in layer), default=-1)


def placement_zone_warnings(placement: PlacementRecord | None, live: Sequence[NodeRecord]) -> tuple[str, ...]:
    """One line per zone of the ``live`` expert nodes whose loss would leave experts of ``placement`` unhosted
    (none without a placement, or unless some live node names a zone and they span two)."""
    if placement is None or not placement.layers:
        return ()
    node_ids, zones = [r.id for r in live], [r.zone for r in live]
    if not any(zones):  # no failure domain named: one node's loss is ClusterStatus's per-node check
        return ()
    zone_of = zone_index(zones, len(live))
    if zone_of is None:
        return ()
    n_experts = n_experts_of(placement, live)
    layer_ids = sorted(placement.layers)
    holders = previous_holders(placement, layer_ids, n_experts, node_ids)
    if holders is None:
        return ()
    # the slots the leader plans with (router/cluster.py::_reconcile): what the "add slots" advice counts
    slots = min(min_slots(live) or default_expert_slots(n_experts, len(live)), n_experts)
    return zone_warnings(holders, zones, zone_of, n_experts, slots, layer_ids)
