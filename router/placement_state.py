"""Between the planner and etcd: a placement record <-> planner terms, and when a new plan is worth publishing.

Pure (no I/O, no clock). The planner speaks node *indices* and per-layer lists; the etcd placement speaks
node *ids* and ``{"<layer>": {"<expert>": [...]}}`` (see ``moemesh.control.keys.check_placement``). The
record also carries ``"stats"``: what the leader expected when it wrote it (shown by ``moemesh status``)::

    {"reason": "expert nodes joined: expert-2", "nodes": ["expert-0", ...],   # the nodes planned over
     "balancedness": {"<layer>": 0.98, ...}, "node_loads": {"<node id>": [load per layer], ...},
     "moved": 12, "window_tokens": 48210}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from moemesh.control.keys import check_placement

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


def previous_holders(placement: object, moe_layers: Sequence[int], n_experts: int,
                     node_ids: Sequence[str]) -> list[list[list[int]]] | None:
    """The placement's replicas as planner input: per layer, per expert, indices into ``node_ids``.

    Replicas on nodes not in ``node_ids`` (gone, draining, unreachable) are dropped; an expert left with
    none is empty (the planner puts it in a free slot). None when there is no usable placement.
    """
    try:
        check_placement(placement)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return None
    index = {node: i for i, node in enumerate(node_ids)}
    out = []
    for layer in moe_layers:
        experts = placement["layers"].get(str(layer))  # type: ignore[index]
        if experts is None:
            return None
        out.append([sorted(index[n] for n in experts.get(str(e), []) if n in index) for e in range(n_experts)])
    return out


def placement_record(plan: Plan, version: int, moe_layers: Sequence[int], node_ids: Sequence[str],
                     reason: str, window_tokens: int = 0) -> dict:
    """The etcd placement for ``plan`` (planned over ``node_ids``, layers in ``moe_layers`` order)."""
    layers, shares, balance = {}, {}, {}
    node_loads: dict[str, list[float]] = {node: [] for node in node_ids}
    for layer, lp in zip(moe_layers, plan.layers):
        layers[str(layer)] = {str(e): [node_ids[r.node] for r in reps] for e, reps in enumerate(lp.replicas)}
        shares[str(layer)] = {str(e): [r.share for r in reps] for e, reps in enumerate(lp.replicas)}
        balance[str(layer)] = round(lp.balancedness, 6)
        for node, load in zip(node_ids, lp.node_loads):
            node_loads[node].append(round(load, 3))
    return check_placement({
        "version": version, "layers": layers, "shares": shares,
        "stats": {"reason": reason, "nodes": list(node_ids), "balancedness": balance, "node_loads": node_loads,
                  "moved": plan.moved, "window_tokens": int(window_tokens)},
    })


def planned_nodes(placement: object) -> set[str]:
    """The nodes the leader planned over when it wrote ``placement`` (also those that got no replica)."""
    if not isinstance(placement, dict):
        return set()
    stats = placement.get("stats") if isinstance(placement.get("stats"), dict) else {}
    nodes = stats.get("nodes")
    if isinstance(nodes, list):
        return {n for n in nodes if isinstance(n, str)}
    return {n for experts in placement.get("layers", {}).values() for ids in experts.values() for n in ids}


def publish_reason(current: object, new: dict) -> str | None:
    """Why ``new`` should replace ``current`` (replicas moved, or shares changed enough); None: keep current."""
    if not isinstance(current, dict) or current.get("layers") != new["layers"]:
        return "replicas moved"
    old_shares = current.get("shares") or {}
    worst = 0.0
    for layer, experts in new["layers"].items():
        for expert, nodes in experts.items():
            before = (old_shares.get(layer) or {}).get(expert) or [1.0 / len(nodes)] * len(nodes)
            after = new["shares"][layer][expert]
            worst = max(worst, max(abs(a - b) for a, b in zip(after, before)))
    return f"shares changed by up to {worst:.3f}" if worst > SHARE_CHANGE else None


def placement_problem(placement: object, moe_layers, n_experts: int, live_nodes) -> str | None:
    """Why ``placement`` (an etcd value, or None) cannot serve this model on these nodes; None if it can.

    It can when every expert of every MoE layer has replicas and every replica it names is on a live node.
    """
    if placement is None:
        return "there is no placement yet"
    try:
        check_placement(placement)  # type: ignore[arg-type]
    except ValueError as exc:
        return f"the placement is malformed: {exc}"
    live = set(live_nodes)
    layers = placement["layers"]
    for layer in moe_layers:
        experts = layers.get(str(layer))
        if experts is None:
            return f"MoE layer {layer} is not placed"
        for e in range(n_experts):
            if not experts.get(str(e)):
                return f"expert {e} of MoE layer {layer} has no replica"
    gone = sorted({n for experts in layers.values() for ids in experts.values() for n in ids} - live)
    if gone:
        return f"it names expert nodes that are gone, draining or unreachable: {', '.join(gone)}"
    return None
