"""Failure domains for the planner (pure): expert nodes may name a zone; losing a zone should leave every expert
a replica.

The rule: when every expert has >= 2 replicas (the redundancy floor) and the nodes span >= 2 zones, each
expert has a replica outside every zone, i.e. its replicas span >= 2 zones. It can hold only when the nodes
outside any one zone have slots for every expert ((N - N_z) x S >= E for every zone z); otherwise the planner
places as usual and says which experts a zone's loss would leave unhosted (:func:`zone_warnings`).
A node without a zone is its own zone of one (``None`` zones never group nodes together).
"""

from __future__ import annotations

from collections.abc import Sequence

from moemesh.control.placement import describe_missing

from .shares import Holders


def zone_index(zones: Sequence[str | None] | None, n_nodes: int) -> list[int] | None:
    """Zone labels per node -> small ints per node (nodes without one get a zone of their own); None when
    there is no zone or a single one (no failure domain to spread over)."""
    if zones is None:
        return None
    if len(zones) != n_nodes:
        raise ValueError(f"{len(zones)} zones for {n_nodes} nodes: give one zone per node")
    ids: dict[object, int] = {}
    out = [ids.setdefault(z if z is not None else ("node", n), len(ids)) for n, z in enumerate(zones)]
    return out if len(ids) >= 2 else None


def rule_applies(zone_of: Sequence[int] | None, floor: int, n_experts: int, slots_per_node: int) -> bool:
    """Whether the zone rule binds (module docstring): zones, the redundancy floor and the slots for it."""
    if zone_of is None or floor < 2:
        return False
    return all((len(zone_of) - zone_of.count(z)) * slots_per_node >= n_experts for z in set(zone_of))


def spans_zones(nodes: Sequence[int], zone_of: Sequence[int] | None) -> bool:
    """An expert on ``nodes`` survives any one zone's loss (trivially true without zones)."""
    return zone_of is None or len({zone_of[n] for n in nodes}) >= 2


def exposure(holders: Holders, zone_of: Sequence[int]) -> dict[int, list[int]]:
    """{zone: experts all of whose replicas are in it} (zones whose loss loses nothing are absent)."""
    out: dict[int, list[int]] = {}
    for e, nodes in enumerate(holders):
        zones = {zone_of[n] for n in nodes}
        if len(zones) == 1:
            out.setdefault(next(iter(zones)), []).append(e)
    return out


def zone_warnings(layer_holders: Sequence[Holders], zones: Sequence[str | None], zone_of: Sequence[int] | None,
                  n_experts: int, slots_per_node: int, layer_ids: Sequence[int] | None = None) -> tuple[str, ...]:
    """One line per zone whose loss would leave experts unhosted, naming them and what would fix it.

    Layers are named by ``layer_ids`` (the model's MoE layer indices, in ``layer_holders`` order), else by
    position."""
    if zone_of is None:
        return ()
    ids = range(len(layer_holders)) if layer_ids is None else layer_ids
    gaps: dict[int, dict[int, list[int]]] = {}
    for layer, holders in zip(ids, layer_holders, strict=True):
        for z, experts in exposure(holders, zone_of).items():
            gaps.setdefault(z, {})[layer] = experts
    names = {zone_of[n]: (zones[n] if zones[n] is not None else f"of node {n}") for n in range(len(zone_of))}
    out = []
    for z in sorted(gaps, key=lambda z: str(names[z])):
        outside = (len(zone_of) - zone_of.count(z)) * slots_per_node
        need = (f"the nodes outside it have {outside} slots per layer for {n_experts} experts"
                if outside < n_experts else "every expert needs 2 replicas (nodes x slots >= 2 x experts)")
        out.append(f"losing zone {names[z]} would leave experts unhosted ({describe_missing(gaps[z])}): {need}; "
                   "add slots or nodes in other zones")
    return tuple(out)
