"""Expert placement planner (pure: no I/O, no clock, no randomness; the same input gives the same plan).

Glossary (one vocabulary with ``moemesh.control.placement``):

* **logical expert**: expert id ``e`` of one MoE layer (E of them per layer);
* **replica** (physical expert): one copy of a logical expert's weights on one expert node; every logical
  expert has >= 1 replica, never two on the same node;
* **redundancy floor**: when the slots allow (N >= 2 and N*S >= 2E) every logical expert has >= 2 replicas,
  so losing any one node leaves each expert a replica (``moemesh.control.placement.survivable_slots``);
* **slot**: room for one replica on a node, per MoE layer; every node has S slots (N nodes, N*S >= E);
  the N*S - E spare slots take **redundant** replicas of hot experts;
* **share**: the fraction of a logical expert's tokens one of its replicas takes (shares of an expert sum to 1);
* **node load**: sum over the replicas on a node of (expert load x share);
* **balancedness**: mean node load / max node load, per layer (1.0 = perfect; 1.0 when nothing is loaded);
* **moved**: replicas placed on a node that did not hold that logical expert in the previous placement
  (without a previous placement, every replica counts as moved: all weights have to be loaded).

Algorithm, per layer:

1. *Replicate*: every expert starts with the redundancy floor's replicas (2 when the slots allow, else 1);
   give the remaining spare slots one at a time to the expert with the highest load per replica
   (ties: lower expert id), at most N replicas per expert, never to an expert with zero load.
2. *Pack*: replicas in order of load per replica (hottest first, ties by expert id) go to the least loaded node
   (ties: lower node index) that has a free slot and does not hold the expert yet. If every node with a free slot
   already holds the expert, a replica of another expert is moved from the least loaded full node to that free
   slot first (always possible; see ``_pack``).
3. *Shares*: water-fill each replicated expert's load over its nodes given the other experts' loads, sweeping
   until nothing changes. This is block coordinate descent on the sum of squared node loads, whose minimum also
   minimises the maximum node load for this kind of (transportation) problem.
4. The plan with only the floor's replicas is computed too; the replicated plan is used unless it is worse
   (so replication is never worse than none).

With a previous placement, the layer is re-planned to move as few replicas as it takes to reach ``min_balance``
(default 0.97) balancedness: first by re-sharing alone (the previous replicas kept, shares water-filled: nothing
moves when that suffices); else by the minimal-move program of ``router/min_moves.py`` (an exact mixed-integer
program over the slots, the redundancy floor and the zones), which also places experts whose nodes all left
and restores the redundancy floor. When no plan within the slots reaches ``min_balance``, the target becomes
the fresh plan's balancedness (the best this planner knows), still with the fewest moves. If the program finds
nothing in its time limit, greedy moves off the most loaded node (``router/greedy_moves.py``) are tried, and
failing those the fresh plan is used, its nodes relabelled to overlap the previous placement as
much as possible (nodes are interchangeable in a fresh plan), so it moves as few replicas as that plan allows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

from .greedy_moves import greedy_holders
from .min_moves import DEFAULT_TIME_LIMIT_S, min_move_holders

MIN_LAYER_TIME_S = 0.05  # the minimal-move program's least time per layer under a plan budget
from .shares import Holders, evaluate as _evaluate
from .zones import rule_applies, spans_zones, zone_index, zone_warnings

DEFAULT_MIN_BALANCE = 0.97


class PlanError(ValueError):
    """The planner's input is wrong (loads, node or slot counts, previous placement); the message says how."""


@dataclass(frozen=True)
class Replica:
    """One physical copy of a logical expert: on ``node``, taking ``share`` of the expert's tokens."""

    node: int
    share: float


@dataclass(frozen=True)
class LayerPlan:
    """One MoE layer: ``replicas[e]`` are expert e's replicas by ascending node index."""

    replicas: tuple[tuple[Replica, ...], ...]  # [E][replicas of e]
    node_loads: tuple[float, ...]  # [N]
    balancedness: float
    moved: int
    kept_previous: bool  # True when the previous replicas were kept (shares only re-balanced, moved 0)


@dataclass(frozen=True)
class Plan:
    n_nodes: int
    slots_per_node: int
    layers: tuple[LayerPlan, ...]
    warnings: tuple[str, ...] = ()  # e.g. losing a zone would leave experts unhosted (``router/zones.py``)

    @property
    def moved(self) -> int:
        return sum(layer.moved for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        """The plan as a JSON-able dict; :func:`previous_from_json` reads it back as a previous placement."""
        return {
            "nodes": self.n_nodes,
            "slots_per_node": self.slots_per_node,
            "layers": [
                {
                    "replicas": {str(e): [{"node": r.node, "share": r.share} for r in reps]
                                 for e, reps in enumerate(layer.replicas)},
                    "balancedness": layer.balancedness,
                    "node_loads": list(layer.node_loads),
                    "moved": layer.moved,
                    "kept_previous": layer.kept_previous,
                }
                for layer in self.layers
            ],
            "moved": self.moved,
            "warnings": list(self.warnings),
        }


# ----------------------------------------------------------------------------------------------- validation


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def loads_from_json(data: Any) -> list[list[float]]:
    """``{"loads": [[load of expert e in layer l, ...], ...]}`` -> loads[l][e]; PlanError saying what is wrong."""
    if not isinstance(data, dict) or "loads" not in data:
        raise PlanError('loads must be a JSON object {"loads": [[load of each expert] for each layer]}')
    return check_loads(data["loads"])


def check_loads(loads: Any) -> list[list[float]]:
    if not isinstance(loads, list) or not loads:
        raise PlanError('"loads" must be a non-empty list with one list of expert loads per layer')
    n_experts = None
    out = []
    for l, layer in enumerate(loads):
        if not isinstance(layer, list) or not layer:
            raise PlanError(f"loads of layer {l} must be a non-empty list of numbers, one per expert")
        if n_experts is None:
            n_experts = len(layer)
        elif len(layer) != n_experts:
            raise PlanError(f"ragged loads: layer {l} has {len(layer)} experts, layer 0 has {n_experts}")
        for e, v in enumerate(layer):
            if not _is_number(v):
                raise PlanError(f"load of layer {l} expert {e} is not a number: {v!r}")
            if not math.isfinite(v) or v < 0:
                raise PlanError(f"load of layer {l} expert {e} must be a finite number >= 0, got {v!r}")
        out.append([float(v) for v in layer])
    return out


def _check_shape(n_experts: int, n_nodes: int, slots_per_node: int) -> None:
    for name, v in (("nodes", n_nodes), ("slots per node", slots_per_node)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PlanError(f"{name} must be an integer >= 1, got {v!r}")
    if n_nodes * slots_per_node < n_experts:
        raise PlanError(f"{n_nodes} nodes x {slots_per_node} slots = {n_nodes * slots_per_node} slots per layer, "
                        f"fewer than the {n_experts} experts: add nodes or slots")


def previous_from_json(data: Any) -> list[list[list[int]]]:
    """A plan's JSON (``Plan.to_json``) -> nodes[l][e] holding each expert; PlanError if malformed.

    Only the nodes of each replica are read: shares are re-planned from the new loads anyway.
    """
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
        raise PlanError('previous placement must be a plan\'s JSON: {"layers": [{"replicas": {...}}, ...]}')
    out = []
    for l, layer in enumerate(data["layers"]):
        reps = layer.get("replicas") if isinstance(layer, dict) else None
        if not isinstance(reps, dict):
            raise PlanError(f'previous placement: layer {l} has no "replicas" object')
        n_experts = len(reps)
        if sorted(reps) != sorted(str(e) for e in range(n_experts)):
            raise PlanError(f"previous placement: layer {l}'s expert ids must be 0..{n_experts - 1}")
        experts = []
        for e in range(n_experts):
            entries = reps[str(e)]
            if not isinstance(entries, list):
                raise PlanError(f"previous placement: layer {l} expert {e} must be a list of replicas")
            nodes = []
            for r in entries:
                node = r.get("node") if isinstance(r, dict) else None
                if not isinstance(node, int) or isinstance(node, bool):
                    raise PlanError(f'previous placement: layer {l} expert {e}: replica {r!r} has no integer "node"')
                nodes.append(node)
            experts.append(nodes)
        out.append(experts)
    return out


def _check_previous(previous: Sequence[Sequence[Sequence[int]]], n_layers: int, n_experts: int,
                    n_nodes: int, slots_per_node: int) -> list[Holders]:
    """Previous placement -> per layer holders; it may come from fewer nodes (nodes added), not from more."""
    if len(previous) != n_layers:
        raise PlanError(f"previous placement has {len(previous)} layers, the loads have {n_layers}")
    out = []
    for l, layer in enumerate(previous):
        if len(layer) != n_experts:
            raise PlanError(f"previous placement: layer {l} has {len(layer)} experts, the loads have {n_experts}")
        per_node = [0] * n_nodes
        holders = []
        for e, nodes in enumerate(layer):
            if len(set(nodes)) != len(nodes):
                raise PlanError(f"previous placement: layer {l} expert {e} is twice on one node")
            for n in nodes:
                if not 0 <= n < n_nodes:
                    raise PlanError(f"previous placement: layer {l} expert {e} is on node {n}, "
                                    f"outside 0..{n_nodes - 1}")
                per_node[n] += 1
            holders.append(tuple(sorted(nodes)))
        for n, count in enumerate(per_node):
            if count > slots_per_node:
                raise PlanError(f"previous placement: layer {l} node {n} holds {count} experts, "
                                f"more than {slots_per_node} slots")
        out.append(tuple(holders))
    return out


# ----------------------------------------------------------------------------------------------- algorithm


def redundancy_floor(n_experts: int, n_nodes: int, slots_per_node: int, replicate: bool = True) -> int:
    """Replicas every expert gets before hot replicas: 2 on distinct nodes when the slots allow it (one node
    loss then leaves each expert a replica), else 1; 1 with ``replicate=False``."""
    return 2 if replicate and n_nodes >= 2 and n_nodes * slots_per_node >= 2 * n_experts else 1


def _replica_counts(loads: Sequence[float], n_nodes: int, slots_per_node: int) -> list[int]:
    counts = [redundancy_floor(len(loads), n_nodes, slots_per_node)] * len(loads)
    for _ in range(min(n_nodes * slots_per_node, n_nodes * len(loads)) - sum(counts)):
        best = None
        for e, load in enumerate(loads):
            if counts[e] < n_nodes and load > 0 and (best is None or load / counts[e] > loads[best] / counts[best]):
                best = e
        if best is None:
            break
        counts[best] += 1
    return counts


def _pack(loads: Sequence[float], counts: Sequence[int], n_nodes: int, slots_per_node: int,
          zone_of: Sequence[int] | None = None) -> Holders:
    """Greedy: hottest replica first onto the least loaded node with a free slot that lacks the expert (with
    zones: first in a zone that lacks it too)."""
    per_replica = [load / c for load, c in zip(loads, counts)]
    node_load = [0.0] * n_nodes
    held: list[set[int]] = [set() for _ in range(n_nodes)]
    for e in sorted(range(len(loads)), key=lambda e: (-per_replica[e], e)):
        for _ in range(counts[e]):
            free = [n for n in range(n_nodes) if len(held[n]) < slots_per_node and e not in held[n]]
            if not free:
                # Every node with a free slot holds e. Take the least loaded node m lacking e (it is full) and
                # move one of its experts f to a free node n: n holds < S experts, one of them e (not on m),
                # so some expert of m's S is not on n.
                n = next(n for n in range(n_nodes) if len(held[n]) < slots_per_node)
                m = min((m for m in range(n_nodes) if e not in held[m]), key=lambda m: (node_load[m], m))
                f = min((f for f in held[m] if f not in held[n]), key=lambda f: (per_replica[f], f))
                held[m].remove(f)
                held[n].add(f)
                node_load[m] -= per_replica[f]
                node_load[n] += per_replica[f]
                free = [m]
            zones_of_e = set() if zone_of is None else {zone_of[n] for n in range(n_nodes) if e in held[n]}
            node = min(free, key=lambda n: (zone_of is not None and zone_of[n] in zones_of_e, node_load[n], n))
            held[node].add(e)
            node_load[node] += per_replica[e]
    return tuple(tuple(n for n in range(n_nodes) if e in held[n]) for e in range(len(loads)))


def _relabel(holders: Holders, previous: Holders, n_nodes: int, zone_of: Sequence[int] | None = None) -> Holders:
    """Rename a fresh plan's nodes so it overlaps ``previous`` the most (greedy on overlap, ties by index); with
    zones, only within a zone (so the plan keeps spanning them)."""
    overlap = [[0] * n_nodes for _ in range(n_nodes)]  # [fresh node][previous node]
    for nodes, prev in zip(holders, previous):
        for f in nodes:
            for p in prev:
                overlap[f][p] += 1
    pairs = sorted(((f, p) for f in range(n_nodes) for p in range(n_nodes)
                    if zone_of is None or zone_of[f] == zone_of[p]),
                   key=lambda fp: (-overlap[fp[0]][fp[1]], fp[0], fp[1]))
    rename: dict[int, int] = {}
    taken: set[int] = set()
    for f, p in pairs:
        if f not in rename and p not in taken:
            rename[f] = p
            taken.add(p)
    return tuple(tuple(sorted(rename[n] for n in nodes)) for nodes in holders)


def _moved(holders: Holders, previous: Holders | None) -> int:
    if previous is None:
        return sum(len(nodes) for nodes in holders)
    return sum(1 for nodes, prev in zip(holders, previous) for n in nodes if n not in prev)


def _meets_floor(holders: Holders, floor: int, zone_of: Sequence[int] | None) -> bool:
    return all(len(nodes) >= floor and spans_zones(nodes, zone_of) for nodes in holders)


def _plan_layer(loads: Sequence[float], n_nodes: int, slots_per_node: int, previous: Holders | None,
                min_balance: float, replicate: bool = True, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                zone_of: Sequence[int] | None = None) -> LayerPlan:
    floor = redundancy_floor(len(loads), n_nodes, slots_per_node, replicate)
    spread = zone_of  # fresh plans prefer spreading over zones whenever there are zones
    zone_of = zone_of if rule_applies(zone_of, floor, len(loads), slots_per_node) else None  # enforce the rule?
    fresh = _pack(loads, [floor] * len(loads), n_nodes, slots_per_node, spread)
    result = _evaluate(loads, fresh, n_nodes)
    if replicate:
        replicated = _pack(loads, _replica_counts(loads, n_nodes, slots_per_node), n_nodes, slots_per_node,
                           spread)
        replicated_result = _evaluate(loads, replicated, n_nodes)
        if replicated_result[2] >= result[2]:
            fresh, result = replicated, replicated_result
    holders = fresh
    if previous is not None:
        kept = _evaluate(loads, previous, n_nodes) if _meets_floor(previous, floor, zone_of) else None
        if kept is not None and kept[2] >= min_balance:
            holders, result = previous, kept  # re-sharing suffices: move nothing
        else:
            target = min(min_balance, result[2])
            found = min_move_holders(loads, previous, n_nodes, slots_per_node, floor, target, zone_of,
                                     time_limit_s=time_limit_s)
            if found is None:  # out of time: greedy moves if they reach the target in fewer moves than fresh
                relabelled = _relabel(fresh, previous, n_nodes, spread)
                found = greedy_holders(loads, previous, n_nodes, slots_per_node, floor, target,
                                       _moved(relabelled, previous), zone_of) or relabelled
            holders = found
            result = _evaluate(loads, holders, n_nodes)
    shares, node_load, balancedness = result
    replicas = tuple(tuple(Replica(n, s) for n, s in zip(nodes, sh)) for nodes, sh in zip(holders, shares))
    moved = _moved(holders, previous)
    return LayerPlan(replicas, tuple(node_load), balancedness, moved, previous is not None and moved == 0)


def plan_placement(loads: Sequence[Sequence[float]], n_nodes: int, slots_per_node: int,
                   previous: Sequence[Sequence[Sequence[int]]] | None = None,
                   min_balance: float = DEFAULT_MIN_BALANCE, replicate: bool = True,
                   time_limit_s: float = DEFAULT_TIME_LIMIT_S, zones: Sequence[str | None] | None = None,
                   budget_s: float | None = None) -> Plan:
    """Place every (layer, expert) on ``n_nodes`` nodes of ``slots_per_node`` slots each.

    ``loads[l][e]``: tokens routed to expert e of layer l (>= 0). ``previous[l][e]``: the nodes that held expert e
    of layer l (e.g. from :func:`previous_from_json`): the plan moves the fewest replicas that reach
    ``min_balance`` (in (0, 1]) in every layer (module docstring); an expert with no node in ``previous`` (its nodes
    left) is placed anew. ``replicate=False``: one replica per expert (spare slots stay empty).
    ``time_limit_s``: per layer, for the minimal-move program; ``budget_s``: for the whole plan (each layer
    gets at most an even share of what is left, so a 58-layer model re-plans in bounded time: the leader's
    failure-driven re-plans wait behind it). ``zones[n]``: node n's failure domain (None: its
    own); replicas of an expert then span >= 2 zones when the slots allow (``router/zones.py``), and the plan's
    ``warnings`` name the zones whose loss would leave experts unhosted. Raises PlanError on bad input.
    """
    loads = check_loads([list(layer) for layer in loads])
    _check_shape(len(loads[0]), n_nodes, slots_per_node)
    if not (_is_number(min_balance) and 0 < min_balance <= 1):
        raise PlanError(f"min balance must be a number in (0, 1] (mean / max node load), got {min_balance!r}")
    prev = (_check_previous(previous, len(loads), len(loads[0]), n_nodes, slots_per_node)
            if previous is not None else [None] * len(loads))
    try:
        zone_of = zone_index(zones, n_nodes)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    deadline = None if budget_s is None else time.monotonic() + budget_s
    layers = []
    for i, (layer, p) in enumerate(zip(loads, prev)):
        limit = time_limit_s
        if deadline is not None:  # an even share of what is left, never below a useful minimum
            limit = min(limit, max(MIN_LAYER_TIME_S, (deadline - time.monotonic()) / (len(loads) - i)))
        layers.append(_plan_layer(layer, n_nodes, slots_per_node, p, min_balance, replicate, limit, zone_of))
    layers = tuple(layers)
    holders = [tuple(tuple(r.node for r in reps) for reps in layer.replicas) for layer in layers]
    warnings = zone_warnings(holders, zones or (), zone_of, len(loads[0]), slots_per_node)
    return Plan(n_nodes, slots_per_node, layers, warnings)
