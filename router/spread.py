"""The initial expert placement: every logical expert on at least one node, replicas in spare slots.

Pure functions, no I/O; the leader router calls them and writes the result to etcd.

Vocabulary (as in ``moemesh.placement``): a *logical expert* is (MoE layer, expert id); a
*replica* is one copy of it on a node; a node *slot* holds one replica. ``slots_per_node`` counts
slots per MoE layer (as vLLM's EPLB counts physical experts per layer): a node with 16 slots
hosts up to 16 experts of every MoE layer.

The spread is the same in every MoE layer:

1. primaries: node ``i`` of ``N`` (ids sorted) takes a contiguous range of expert ids; the first
   ``E % N`` nodes take one more than the rest, so counts differ by at most one;
2. replicas (only when ``slots_per_node`` is given and leaves spare slots): round after round,
   expert by expert in id order, one more replica of the expert goes to the node that does not
   host it yet with the most spare slots (ties: the nearest node after its primary, cyclically).
   A round gives each expert at most one more replica, so replicas spread over experts before
   any expert gets a third copy, and no node hosts the same expert twice.

    >>> spread_experts([1, 2], 4, ["a", "b"], None)[1]
    {0: ['a'], 1: ['a'], 2: ['b'], 3: ['b']}
    >>> spread_experts([1], 4, ["a", "b"], 4)[1]
    {0: ['a', 'b'], 1: ['a', 'b'], 2: ['b', 'a'], 3: ['b', 'a']}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from moemesh.etcd_keys import check_placement

Assignment = dict[int, dict[int, list[str]]]  # MoE layer -> expert id -> node ids (primary first)


class SpreadError(ValueError):
    """No placement fits these inputs; the message says which input and what would fit."""


def spread_experts(moe_layers: list[int], n_experts: int, nodes: list[str],
                   slots_per_node: int | None) -> Assignment:
    """Place every expert of every MoE layer on >= 1 node, evenly; replicate into spare slots.

    ``nodes``: node ids (sorted here, so the result does not depend on their order).
    ``slots_per_node``: replicas per MoE layer one node can host; None = unknown (no replicas).
    """
    layers = _check_layers(moe_layers)
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise SpreadError(f"n_experts must be an int >= 1, got {n_experts!r}")
    order = sorted(nodes)
    if not order:
        raise SpreadError("no expert nodes to place experts on: start at least one expert node")
    if len(set(order)) != len(order):
        dupes = sorted({n for n in order if order.count(n) > 1})
        raise SpreadError(f"node ids must be distinct, got {dupes} more than once")
    n = len(order)
    shares = [n_experts // n + (1 if i < n_experts % n else 0) for i in range(n)]
    if slots_per_node is not None:
        if isinstance(slots_per_node, bool) or not isinstance(slots_per_node, int) or slots_per_node < 1:
            raise SpreadError(f"slots_per_node must be an int >= 1 or None, got {slots_per_node!r}")
        if slots_per_node < shares[0]:
            raise SpreadError(
                f"{n} expert node(s) with {slots_per_node} slot(s) per MoE layer hold {n * slots_per_node} "
                f"experts per layer, but every layer has {n_experts}: each node needs >= {shares[0]} slots, "
                f"or start >= {-(-n_experts // slots_per_node)} expert nodes")

    primary: list[int] = []  # expert id -> node index
    for i, share in enumerate(shares):
        primary.extend([i] * share)
    hosts: list[list[int]] = [[p] for p in primary]
    spare = [0 if slots_per_node is None else slots_per_node - s for s in shares]
    while any(spare):
        placed = False
        for e in range(n_experts):
            candidates = [j for j in range(n) if spare[j] > 0 and j not in hosts[e]]
            if not candidates:
                continue
            j = min(candidates, key=lambda j: (-spare[j], (j - primary[e]) % n))
            hosts[e].append(j)
            spare[j] -= 1
            placed = True
        if not placed:  # every node with spare slots already hosts every expert
            break
    row = {e: [order[j] for j in hosts[e]] for e in range(n_experts)}
    return {layer: {e: list(ids) for e, ids in row.items()} for layer in layers}


def placement_dict(version: int, assignment: Mapping[int, Mapping[int, list[str]]]) -> dict:
    """``{"version": v, "layers": {"<layer>": {"<expert>": [node ids]}}}``, the etcd placement schema."""
    return check_placement({
        "version": version,
        "layers": {str(layer): {str(e): list(ids) for e, ids in sorted(experts.items())}
                   for layer, experts in sorted(assignment.items())},
    })


def placement_problem(placement: object, moe_layers: Iterable[int], n_experts: int,
                      live_nodes: Iterable[str]) -> str | None:
    """Why ``placement`` (an etcd value, or None) cannot serve this model on these nodes; None if it can.

    It can when every expert of every MoE layer has replicas and every replica it names is on a
    live node (a placement naming a gone node is republished without it).
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
            ids = experts.get(str(e))
            if not ids:
                return f"expert {e} of MoE layer {layer} has no replica"
    gone = sorted({n for experts in layers.values() for ids in experts.values() for n in ids} - live)
    if gone:
        return f"it names expert nodes that are gone: {', '.join(gone)}"
    return None


def _check_layers(moe_layers: list[int]) -> list[int]:
    layers = list(moe_layers)
    if not layers:
        raise SpreadError("moe_layers is empty: the model has no MoE layer to place")
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
        raise SpreadError(f"moe_layers must be layer indices >= 0, got {layers!r}")
    if len(set(layers)) != len(layers):
        raise SpreadError(f"moe_layers has repeats: {layers!r}")
    return sorted(layers)
