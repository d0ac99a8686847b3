"""``moemesh up --expert-zones Z0,Z1,...``: failure domains for the local mesh's expert nodes (pure).

Expert node ``expert-i`` gets zone ``Z[i mod len(Z)]`` (round-robin, also for nodes MeshControl adds later),
passed as its ``--zone``. The router then puts each expert's replicas in two zones when the slots allow
(``router/zones.py``); :func:`zone_loss_warning` says at start-up when they do not.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from moemesh.cli.flags import UsageError


def parse_zones(text: str) -> list[str]:
    """``a,b,c`` -> ``["a", "b", "c"]``; argparse error for an empty or repeated name."""
    zones = [z.strip() for z in text.split(",")]
    if not all(zones):
        raise argparse.ArgumentTypeError(f"expected comma-separated zone names (e.g. a,b), got {text!r}")
    if len(set(zones)) != len(zones):
        raise argparse.ArgumentTypeError(f"each zone is named once (nodes are assigned round-robin), got {text!r}")
    return zones


def check_zones(zones: Sequence[str] | None, expert_nodes: int) -> None:
    """UsageError when a zone would get no expert node."""
    if zones and len(zones) > expert_nodes:
        raise UsageError(f"--expert-zones names {len(zones)} zones for --expert-nodes {expert_nodes}: each zone "
                         "needs an expert node (name fewer zones or start more expert nodes)")


def zone_of_expert(name: str, zones: Sequence[str] | None) -> str | None:
    """The zone of expert node ``expert-<i>`` (round-robin over ``zones``); None without zones."""
    if not zones:
        return None
    index = int(name.rsplit("-", 1)[1])
    return zones[index % len(zones)]


def zone_loss_warning(n_experts: int, expert_nodes: int, slots: int, zones: Sequence[str] | None,
                      replicate: bool) -> str | None:
    """What ``moemesh up`` says when losing one zone would leave experts unhosted whatever the planner does; None
    when the slots let every expert keep a replica outside each zone (or there are fewer than two zones)."""
    from moemesh.router.planner import redundancy_floor
    from moemesh.router.zones import rule_applies

    if not zones or len(zones) < 2:
        return None
    zone_of = [i % len(zones) for i in range(expert_nodes)]
    floor = redundancy_floor(n_experts, expert_nodes, slots, replicate)
    if rule_applies(zone_of, floor, n_experts, slots):
        return None
    if floor < 2:
        why = "each expert has one replica" if not replicate else (
            f"{expert_nodes} x {slots} slots hold fewer than 2 replicas of each of {n_experts} experts")
    else:
        worst = max(range(len(zones)), key=zone_of.count)
        outside = (expert_nodes - zone_of.count(worst)) * slots
        why = (f"the expert nodes outside zone {zones[worst]} have {outside} slots per MoE layer for {n_experts} "
               "experts")
    return (f"--expert-zones {','.join(zones)} on {expert_nodes} expert nodes: losing one zone stops service ({why}); "
            "raise --expert-slots or --expert-nodes")
