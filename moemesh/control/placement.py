"""Expert placement: which expert node hosts which (layer, expert), and the flag syntax for it.

Vocabulary: a *logical expert* is (MoE layer, expert id); a *replica* is one copy
of it on a node; a placement maps every logical expert to one or more replicas.

Expert specs (``--experts`` on an expert node, the part after ``=`` in
``--expert-nodes``) are comma-separated items:

* ``0-7`` or ``5``: those expert ids in every MoE layer;
* ``3:0-7`` or ``3:5``: those expert ids in MoE layer 3 only;
* ``all``: every expert of every MoE layer.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from moemesh.errors import InvalidRequestError


Node = TypeVar("Node")  # how a caller names nodes: an index into Placement.nodes, or a node id


class SpecError(InvalidRequestError):
    """An expert spec or node list that cannot be parsed; the message shows the bad part."""


def _ids(text: str, n_experts: int, spec: str) -> list[int]:
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-", 1))
        else:
            lo = hi = int(text)
    except ValueError:
        raise SpecError(f"expert spec {spec!r}: {text!r} is not an id or a range like 0-7") from None
    if lo > hi or lo < 0 or hi >= n_experts:
        raise SpecError(f"expert spec {spec!r}: {text!r} is outside 0..{n_experts - 1} or reversed")
    return list(range(lo, hi + 1))


def parse_expert_spec(spec: str, moe_layers: tuple[int, ...], n_experts: int) -> dict[int, list[int]]:
    """``0-3,6`` / ``1:0-3,2:4-7`` / ``all`` -> {MoE layer: sorted expert ids}."""
    hosted: dict[int, set[int]] = {}
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise SpecError("expert spec is empty: give ids like 0-7, per-layer items like 3:0-7, or 'all'")
    for item in items:
        if item == "all":
            for layer in moe_layers:
                hosted.setdefault(layer, set()).update(range(n_experts))
            continue
        if ":" in item:
            layer_text, ids_text = item.split(":", 1)
            try:
                layers = [int(layer_text)]
            except ValueError:
                raise SpecError(f"expert spec {spec!r}: layer {layer_text!r} is not an integer") from None
            if layers[0] not in moe_layers:
                raise SpecError(f"expert spec {spec!r}: layer {layers[0]} is not a MoE layer (MoE layers: "
                                f"{_ranges(list(moe_layers))})")
        else:
            layers, ids_text = list(moe_layers), item
        for layer in layers:
            hosted.setdefault(layer, set()).update(_ids(ids_text, n_experts, spec))
    return {layer: sorted(ids) for layer, ids in sorted(hosted.items())}


def parse_expert_nodes(text: str) -> list[tuple[str, str]]:
    """``HOST:PORT=SPEC,HOST:PORT=SPEC`` -> [(address, spec)]; a spec may itself contain commas."""
    nodes: list[tuple[str, str]] = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        if "=" in item:
            address, spec = item.split("=", 1)
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise SpecError(f"expert node {address!r} must be HOST:PORT")
            nodes.append((address, spec))
        elif nodes:
            nodes[-1] = (nodes[-1][0], f"{nodes[-1][1]},{item}")
        else:
            raise SpecError(f"--expert-nodes {text!r}: expected HOST:PORT=SPEC first, got {item!r}")
    if not nodes:
        raise SpecError("--expert-nodes is empty: give HOST:PORT=SPEC[,HOST:PORT=SPEC...]")
    return nodes


def _ranges(ids: list[int]) -> str:
    """[0,1,2,5] -> '0-2,5' (for messages)."""
    out, start = [], None
    for i, v in enumerate(ids):
        if start is None:
            start = v
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            out.append(f"{start}-{v}" if v != start else f"{v}")
            start = None
    return ",".join(out)


@dataclass(frozen=True)
class Placement:
    """Nodes by address and, per logical expert, the nodes holding a replica (in preference order)."""

    nodes: tuple[str, ...]
    replicas: dict[tuple[int, int], tuple[int, ...]] = field(hash=False)
    version: int = 0
    # Fraction of a logical expert's tokens each replica takes (aligned with ``replicas``); missing = equal.
    shares: dict[tuple[int, int], tuple[float, ...]] = field(default_factory=dict, hash=False)

    def share_of(self, key: tuple[int, int]) -> tuple[float, ...]:
        nodes = self.replicas.get(key, ())
        return self.shares.get(key) or tuple(1.0 / len(nodes) for _ in nodes)

    @classmethod
    def from_hosted(cls, hosted: list[tuple[str, dict[int, list[int]]]], version: int = 0) -> "Placement":
        replicas: dict[tuple[int, int], list[int]] = {}
        for node, (_, layers) in enumerate(hosted):
            for layer, ids in layers.items():
                for e in ids:
                    replicas.setdefault((layer, e), []).append(node)
        return cls(tuple(a for a, _ in hosted), {k: tuple(v) for k, v in replicas.items()}, version)

    def missing(self, moe_layers: tuple[int, ...], n_experts: int,
                alive: Container[int] | None = None) -> dict[int, list[int]]:
        """Logical experts no node (no node in ``alive``, when given) hosts: {layer: expert ids}."""
        return missing_experts(self.replicas, moe_layers, n_experts, alive)

    def require_complete(self, moe_layers: tuple[int, ...], n_experts: int) -> None:
        gaps = self.missing(moe_layers, n_experts)
        if gaps:
            raise SpecError(f"no expert node hosts {describe_missing(gaps)}: add nodes or widen their specs")


def missing_experts(replicas: Mapping[tuple[int, int], Iterable[Node]], moe_layers: Iterable[int], n_experts: int,
                    alive: Container[Node] | None = None) -> dict[int, list[int]]:
    """The logical experts with no replica (none on a node in ``alive``, when given): {layer: sorted ids}.

    ``replicas`` maps (MoE layer, expert id) to the nodes holding a copy, by whatever names the caller uses
    (node indices of a :class:`Placement`, node ids of a placement record). Only layers with a gap appear.
    """
    gaps: dict[int, list[int]] = {}
    for layer in moe_layers:
        lacking = [e for e in range(n_experts)
                   if not any(alive is None or n in alive for n in replicas.get((layer, e), ()))]
        if lacking:
            gaps[layer] = lacking
    return gaps


MAX_SHOWN = 4  # groups of layers a message names before it says how many more there are
MAX_RANGES = 8  # id ranges a group names before it says how many ids are left


def _short_ranges(ids: list[int], max_ranges: int = MAX_RANGES) -> str:
    """_ranges, cut after ``max_ranges`` ranges: [0,2,4,...,30] -> '0,2,4,6,8,10,12,14 and 8 more'."""
    parts = _ranges(ids).split(",")
    if len(parts) <= max_ranges:
        return ",".join(parts)
    shown = parts[:max_ranges]
    named = sum(int(p.split("-")[1]) - int(p.split("-")[0]) + 1 if "-" in p else 1 for p in shown)
    return f"{','.join(shown)} and {len(ids) - named} more"


def describe_missing(gaps: Mapping[int, Sequence[int]], max_shown: int = MAX_SHOWN) -> str:
    """{layer: expert ids} -> 'layers 1-3: experts 4-7; layer 5: experts 0,2' (short enough for a message).

    Layers missing the same experts are named together (one lost node usually takes the same ids from every
    layer); past ``max_shown`` groups the rest is counted, not listed.
    """
    groups: dict[tuple[int, ...], list[int]] = {}  # ids -> layers missing them, in order of first layer
    for layer, ids in sorted(gaps.items()):
        groups.setdefault(tuple(sorted(ids)), []).append(layer)
    parts = [f"{'layers' if len(layers) > 1 else 'layer'} {_ranges(layers)}: "
             f"experts {_short_ranges(list(ids))}" for ids, layers in groups.items()]
    if len(parts) > max_shown:
        hidden = sum(len(layers) for layers in list(groups.values())[max_shown:])
        parts = parts[:max_shown] + [f"{hidden} more layers"]
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------- slot sizing
#
# A *slot* is room for one replica per MoE layer on an expert node. With E experts per layer on N nodes of S
# slots, one node's loss is survived when every expert keeps a live replica on another node. Two bounds:
#
# * capacity: the N - 1 survivors must be able to hold every expert, S >= ceil(E / (N - 1));
# * redundancy: every expert already has 2 replicas on distinct nodes, so the loss leaves one serving at once
#   (no weights to load while requests wait), N * S >= 2E, i.e. S >= ceil(2E / N).
#
# For N >= 2, ceil(2E / N) >= ceil(E / (N - 1)), so the redundancy bound implies the capacity one (the
# survivors' (N - 1) * ceil(2E / N) >= E slots also fit the re-plan that restores redundancy when they can).
# N = 1 cannot survive its loss whatever its slots: there is no other node.

HOT_MARGIN_PARTS = 10
"""Extra slots beyond the redundancy bound: a tenth of the even share E / N, rounded up (so >= 1).

Small on purpose: the two replicas every expert has already let the planner move load between two nodes by
their shares, which balances most skews; the margin gives the hottest experts a third replica. (Before the
redundancy floor the default was the even share + 25%: then the spare slots were all the balancing there was.)
"""


def survivable_slots(n_experts: int, n_nodes: int) -> int | None:
    """The fewest slots per node with which losing any one of ``n_nodes`` nodes leaves every expert a replica
    (``min(E, ceil(2E / N))``); None for one node, whose loss nothing survives."""
    _check_sizing(n_experts, n_nodes)
    if n_nodes == 1:
        return None
    return min(n_experts, -(-2 * n_experts // n_nodes))


def default_expert_slots(n_experts: int, n_nodes: int) -> int:
    """Slots per expert node by default: :func:`survivable_slots` plus a tenth (:data:`HOT_MARGIN_PARTS`) of the
    even share,
    at most every expert; one node holds every expert (and cannot survive its loss)."""
    floor = survivable_slots(n_experts, n_nodes)
    if floor is None:
        return n_experts
    return min(n_experts, floor - (-n_experts // (HOT_MARGIN_PARTS * n_nodes)))  # integer ceil: no float edge


def loss_survivable(n_experts: int, n_nodes: int, slots: int) -> bool:
    """Whether ``n_nodes`` nodes of ``slots`` slots can place every expert twice on distinct nodes."""
    floor = survivable_slots(n_experts, n_nodes)
    return floor is not None and slots >= floor


def _check_sizing(n_experts: int, n_nodes: int) -> None:
    for name, v in (("experts per MoE layer", n_experts), ("expert nodes", n_nodes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SpecError(f"{name} must be an integer >= 1, got {v!r}")


def loss_exposure(hosted: Mapping[str, Mapping[int, Iterable[int]]]) -> dict[str, dict[int, list[int]]]:
    """For each node, the experts its loss would leave with no replica: those no other node hosts.

    ``hosted``: node -> {MoE layer: expert ids it serves} (the nodes that serve now; leave out draining or
    failed ones). Nodes whose loss is survived are absent; an empty result means any one loss is survived.
    """
    holders: dict[tuple[int, int], set[str]] = {}
    for node, layers in hosted.items():
        for layer, ids in layers.items():
            for e in ids:
                holders.setdefault((int(layer), int(e)), set()).add(node)
    out: dict[str, dict[int, list[int]]] = {}
    for (layer, e), nodes in sorted(holders.items()):
        if len(nodes) == 1:
            (node,) = nodes
            out.setdefault(node, {}).setdefault(layer, []).append(e)
    return {node: out[node] for node in sorted(out)}


def describe_exposure(exposure: Mapping[str, Mapping[int, list[int]]], limit: int = 4) -> str:
    """``survivable`` or ``NOT survivable (losing N would lose layer L: experts ...; ...)`` for status lines."""
    if not exposure:
        return "survivable"
    parts = []
    for node, gaps in list(exposure.items())[:limit]:
        parts.append(f"losing {node[:64]} would lose {describe_missing(gaps, max_shown=2)}")
    if len(exposure) > limit:
        parts.append(f"and {len(exposure) - limit} more nodes")
    return f"NOT survivable ({'; '.join(parts)})"
