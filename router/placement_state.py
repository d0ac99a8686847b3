"""Between the planner and etcd: a placement record <-> planner terms, and when a new plan is worth publishing.

Pure (no I/O, no clock). The planner speaks node *indices* and per-layer lists; the placement speaks node
*ids* (:class:`moemesh.control.records.PlacementRecord`, whose ``stats`` say what the leader expected when it
wrote it, shown by ``moemesh status``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from moemesh.control.records import PlacementRecord, PlacementStats

from .planner import Plan

SHARE_CHANGE = 0.05  # a shares-only re-plan is published when some replica's share moves by more than this


def loads_matrix(observed: Mapping[int, Sequence[float]], moe_layers: Sequence[int], n_experts: int) -> list[list[float]]:
    """Per MoE layer (in ``moe_layers`` order) the tokens routed to each expert.

    A layer nobody reported, or with no tokens yet, counts every expert equally (an even spread is the
    best guess before traffic arrives).
    """
    out = []
    for layer in moe_layers:
        row = [float(v) for v in observed.get(layer, ())][:n_experts]
        row += [0.0] * (n_experts - len(row))
        out.append(row if sum(row) > 0 else [1.0] * n_experts)
    return out


def read_placement(value: object) -> tuple[PlacementRecord | None, str | None]:
    """The stored placement value (None: none) as a record, or why it is malformed."""
    if value is None:
        return None, None
    try:
        return PlacementRecord.from_json(value), None
    except (ValueError, TypeError) as exc:
        return None, f"the placement is malformed: {exc}"


def version_of(value: object) -> int:
    """A stored placement's version, read leniently (also from a malformed one), 0 when there is none."""
    version = value.get("version") if isinstance(value, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) and version >= 0 else 0


def previous_holders(placement: PlacementRecord | None, moe_layers: Sequence[int], n_experts: int,
                     node_ids: Sequence[str]) -> list[list[list[int]]] | None:
    """The placement's replicas as planner input: per layer, per expert, indices into ``node_ids``.

    Replicas on nodes not in ``node_ids`` (gone, draining, unreachable) are dropped; an expert left with
    none is empty (the planner puts it in a free slot). None when there is no usable placement.
    """
    if placement is None:
        return None
    index = {node: i for i, node in enumerate(node_ids)}
    out = []
    for layer in moe_layers:
        experts = placement.layers.get(layer)
        if experts is None:
            return None
        out.append([sorted(index[n] for n in experts.get(e, ()) if n in index) for e in range(n_experts)])
    return out


def placement_record(plan: Plan, version: int, moe_layers: Sequence[int], node_ids: Sequence[str],
                     reason: str, window_tokens: int = 0) -> PlacementRecord:
    """The placement for ``plan`` (planned over ``node_ids``, layers in ``moe_layers`` order)."""
    layers, shares, balance = {}, {}, {}
    node_loads: dict[str, list[float]] = {node: [] for node in node_ids}
    for layer, lp in zip(moe_layers, plan.layers):
        layers[layer] = MappingProxyType({e: tuple(node_ids[r.node] for r in reps)
                                          for e, reps in enumerate(lp.replicas)})
        shares[layer] = MappingProxyType({e: tuple(r.share for r in reps) for e, reps in enumerate(lp.replicas)})
        balance[layer] = round(lp.balancedness, 6)
        for node, load in zip(node_ids, lp.node_loads):
            node_loads[node].append(round(load, 3))
    stats = PlacementStats(reason, tuple(node_ids), MappingProxyType(balance),
                           MappingProxyType({node: tuple(v) for node, v in node_loads.items()}), plan.moved,
                           int(window_tokens))
    # through JSON once: the record the leader writes is exactly the one nodes will read back
    return PlacementRecord.from_json(PlacementRecord(version, MappingProxyType(layers), MappingProxyType(shares),
                                                     stats).to_json())


def planned_nodes(placement: PlacementRecord | None) -> set[str]:
    """The nodes the leader planned over when it wrote ``placement`` (also those that got no replica)."""
    return set() if placement is None else placement.planned_nodes()


def publish_reason(current: PlacementRecord | None, new: PlacementRecord) -> str | None:
    """Why ``new`` should replace ``current`` (replicas moved, or shares changed enough); None: keep current."""
    if current is None or current.layers != new.layers:
        return "replicas moved"
    worst = 0.0
    for layer, experts in new.layers.items():
        for expert in experts:
            after, before = new.share_of(layer, expert), current.share_of(layer, expert)
            worst = max(worst, max(abs(a - b) for a, b in zip(after, before)))
    return f"shares changed by up to {worst:.3f}" if worst > SHARE_CHANGE else None


def placement_problem(placement: PlacementRecord | None, moe_layers, n_experts: int, live_nodes) -> str | None:
    """Why ``placement`` (None: there is none) cannot serve this model on these nodes; None if it can.

    It can when every expert of every MoE layer has replicas and every replica it names is on a live node.
    (A stored value that does not parse is :func:`read_placement`'s to describe.)
    """
    if placement is None:
        return "there is no placement yet"
    for layer in moe_layers:
        experts = placement.layers.get(layer)
        if experts is None:
            return f"MoE layer {layer} is not placed"
        for e in range(n_experts):
            if not experts.get(e):
                return f"expert {e} of MoE layer {layer} has no replica"
    gone = sorted(set(placement.node_ids()) - set(live_nodes))
    if gone:
        return f"it names expert nodes that are gone, draining or unreachable: {', '.join(gone)}"
    return None
