"""Typed etcd records: a node's record and the expert placement, read and written as frozen dataclasses.

Vocabulary (one for the whole mesh):

* a **logical expert** is ``(MoE layer, expert id)``: one of the ``n_routed_experts`` routed experts of a
  MoE layer of the model;
* a **physical replica** is one copy of a logical expert's weights on one expert node; a hot logical
  expert may have several, and its tokens are split between them by the placement's **shares**;
* a **slot** is room for one replica per MoE layer on an expert node (``capacity.slots``);
* the **placement** maps every logical expert to the expert nodes holding its replicas; the leader
  router writes it, and each write bumps the **placement version**. Nodes publish the version they have
  applied (``placement_version`` in their record), so others know when a version is in force.

The JSON stays what it always was (``moemesh/control/etcd.py`` shows both shapes): ``from_json`` checks a
value read from etcd (``keys.check_node_record`` / ``keys.check_placement`` first, then every field's type)
and raises ValueError naming the bad field; ``to_json`` gives back the same dict (``to_json(from_json(d)) ==
d`` for every valid ``d``, unknown fields included, so a node of this version rewrites what a newer one
wrote without losing anything). JSON object keys are strings; here layers and expert ids are ints.
A JSON ``null`` for an optional field reads as absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from moemesh.control.keys import check_node_record, check_placement

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _int(what: str, value: object, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


def _opt(what: str, value: object, kind: type) -> Any:
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{what} must be a {kind.__name__}, got {value!r}")
    return value


def _opt_int(what: str, value: object, minimum: int = 0) -> int | None:
    return None if value is None else _int(what, value, minimum)


def _key(what: str, text: object) -> int:
    """A JSON object key that names a layer or an expert id ("3" -> 3)."""
    try:
        value = int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what} {text!r} is not an integer") from None
    if value < 0 or str(value) != text:
        raise ValueError(f"{what} {text!r} must be an integer >= 0 written plainly")
    return value


def _number(what: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return value  # kept as written (an int stays an int, so to_json gives back the same value)


def _put(out: dict, name: str, value: object) -> None:
    if value is not None:
        out[name] = value


# ---- node records ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Capacity:
    """What a node can hold. Expert nodes: the model's shape and their slots; attention nodes: their KV cache."""

    moe_layers: tuple[int, ...] | None = None  # the model's MoE layer indices (ModelConfig.moe_layers)
    n_routed_experts: int | None = None  # routed experts per MoE layer
    slots: int | None = None  # replicas per MoE layer the node can hold (None: the leader sizes it)
    checkpoint: str | None = None  # moemesh.model.checkpoint.checkpoint_fingerprint of its model
    kv_cache_tokens: int | None = None  # attention nodes: tokens the latent cache holds
    max_num_seqs: int | None = None  # attention nodes: sequences batched at once
    extra: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)  # fields this version does not know

    _FIELDS = ("moe_layers", "n_routed_experts", "slots", "checkpoint", "kv_cache_tokens", "max_num_seqs")

    @classmethod
    def from_json(cls, value: object) -> "Capacity":
        if not isinstance(value, dict):
            raise ValueError(f"node capacity must be a JSON object, got {value!r}")
        layers = value.get("moe_layers")
        if layers is not None:
            if not isinstance(layers, list):
                raise ValueError(f"capacity.moe_layers must be a list of MoE layer indices, got {layers!r}")
            layers = tuple(_int("capacity.moe_layers item", x) for x in layers)
        return cls(layers,
                   _opt_int("capacity.n_routed_experts", value.get("n_routed_experts"), 1),
                   _opt_int("capacity.slots", value.get("slots"), 1),
                   _opt("capacity.checkpoint", value.get("checkpoint"), str),
                   _opt_int("capacity.kv_cache_tokens", value.get("kv_cache_tokens")),
                   _opt_int("capacity.max_num_seqs", value.get("max_num_seqs")),
                   MappingProxyType({k: v for k, v in value.items() if k not in cls._FIELDS}))

    def to_json(self) -> dict:
        out: dict = {}
        _put(out, "moe_layers", None if self.moe_layers is None else list(self.moe_layers))
        for name in self._FIELDS[1:]:
            _put(out, name, getattr(self, name))
        return {**out, **self.extra}


@dataclass(frozen=True)
class NodeRecord:
    """One node's record under ``nodes/<role>/<id>``, bound to its lease (see moemesh/control/etcd.py)."""

    id: str
    role: str  # "attn" | "expert"
    address: str  # HOST:PORT others dial
    status: str  # "loading" | "ready" | "draining" | "failed"
    # Expert nodes: the replicas held now, {MoE layer: expert ids}; None when the record has no "experts".
    experts: Mapping[int, tuple[int, ...]] | None = None
    placement_version: int | None = None  # the placement version this node has applied (None: follows none)
    capacity: Capacity | None = None
    tls: bool | None = None  # the node's ports serve TLS
    torch_store: str | None = None  # expert nodes with --transport torch: where torch pair groups meet
    error: str | None = None  # status "failed": why the node cannot apply the placement
    # Expert nodes: the failure domain (rack, zone) whose loss the planner spreads replicas against (--zone).
    zone: str | None = None
    extra: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    _FIELDS = ("id", "role", "address", "status", "experts", "placement_version", "capacity", "tls",
               "torch_store", "error", "zone")

    @classmethod
    def from_json(cls, value: object) -> "NodeRecord":
        """Check a record read from etcd; ValueError names the bad field (TypeError: not JSON at all)."""
        record = check_node_record(value)  # type: ignore[arg-type]
        experts = record.get("experts")
        if experts is not None:
            experts = {_key("node experts layer", layer): tuple(_int(f"node experts[{layer!r}] id", e) for e in ids)
                       for layer, ids in experts.items()}
        capacity = record.get("capacity")
        return cls(record["id"], record["role"], record["address"], record["status"],
                   None if experts is None else MappingProxyType(experts),
                   _opt_int("node placement_version", record.get("placement_version")),
                   None if capacity is None else Capacity.from_json(capacity),
                   _opt("node tls", record.get("tls"), bool),
                   _opt("node torch_store", record.get("torch_store"), str),
                   _opt("node error", record.get("error"), str),
                   _opt("node zone", record.get("zone"), str),
                   MappingProxyType({k: v for k, v in record.items() if k not in cls._FIELDS}))

    def to_json(self) -> dict:
        out: dict = {"id": self.id, "role": self.role, "address": self.address, "status": self.status}
        if self.experts is not None:
            out["experts"] = {str(layer): list(ids) for layer, ids in self.experts.items()}
        _put(out, "placement_version", self.placement_version)
        _put(out, "capacity", None if self.capacity is None else self.capacity.to_json())
        for name in ("tls", "torch_store", "error", "zone"):
            _put(out, name, getattr(self, name))
        return {**out, **self.extra}

    def hosted(self) -> dict[int, tuple[int, ...]]:
        """The replicas this node says it holds: {MoE layer: sorted expert ids}, layers in order."""
        return {layer: tuple(sorted(ids)) for layer, ids in sorted((self.experts or {}).items())}

    @property
    def serving(self) -> bool:
        """Ready or draining: may still be routed to."""
        return self.status in ("ready", "draining")


# ---- the placement -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PlacementStats:
    """What the leader expected when it wrote a placement (shown by ``moemesh status``)."""

    reason: str = ""  # why it re-planned, e.g. "expert nodes joined: expert-2"
    nodes: tuple[str, ...] | None = None  # the expert nodes planned over (also those that got no replica)
    balancedness: Mapping[int, float] = field(default_factory=lambda: _EMPTY)  # per MoE layer: mean / max node load
    node_loads: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: _EMPTY)  # per node: planned load per layer
    moved: int = 0  # replicas that moved against the previous placement
    window_tokens: int = 0  # routed tokens in the load window the plan was made on
    extra: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    # per node: load per layer under the shares written, when they differ from the plan's (stragglers given less,
    # router/straggler_shares.py); empty: as planned
    applied_loads: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: _EMPTY)

    _FIELDS = ("reason", "nodes", "balancedness", "node_loads", "moved", "window_tokens", "applied_loads")

    @classmethod
    def from_json(cls, value: object) -> "PlacementStats":
        """Missing fields take their defaults (the stats only inform); present ones must have the right type.

        ``nodes`` stays None when absent: then the nodes planned over are those the placement names.
        """
        if not isinstance(value, dict):
            raise ValueError(f"placement stats must be a JSON object, got {value!r}")
        nodes = value.get("nodes")
        if nodes is not None and (not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes)):
            raise ValueError(f"placement stats.nodes must be a list of node ids, got {nodes!r}")
        balance = value.get("balancedness", {})
        loads = value.get("node_loads", {})
        applied = value.get("applied_loads", {})
        if not isinstance(balance, dict) or not isinstance(loads, dict) or not isinstance(applied, dict):
            raise ValueError("placement stats.balancedness, stats.node_loads and stats.applied_loads must be JSON "
                             f"objects, got {balance!r}, {loads!r} and {applied!r}")
        for name, table in (("node_loads", loads), ("applied_loads", applied)):
            if not all(isinstance(v, list) for v in table.values()):
                raise ValueError(f"placement stats.{name} must map node id -> [load per layer], got {table!r}")
        return cls(_opt("placement stats.reason", value.get("reason", ""), str),
                   None if nodes is None else tuple(nodes),
                   MappingProxyType({_key("placement stats.balancedness layer", layer):
                                     _number(f"placement stats.balancedness[{layer!r}]", b)
                                     for layer, b in balance.items()}),
                   MappingProxyType({node: tuple(_number(f"placement stats.node_loads[{node!r}] item", x) for x in v)
                                     for node, v in loads.items()}),
                   _int("placement stats.moved", value.get("moved", 0)),
                   _int("placement stats.window_tokens", value.get("window_tokens", 0)),
                   MappingProxyType({k: v for k, v in value.items() if k not in cls._FIELDS}),
                   MappingProxyType({node: tuple(_number(f"placement stats.applied_loads[{node!r}] item", x)
                                                 for x in v) for node, v in applied.items()}))

    def to_json(self) -> dict:
        out: dict = {"reason": self.reason}
        _put(out, "nodes", None if self.nodes is None else list(self.nodes))
        if self.applied_loads:
            out["applied_loads"] = {node: list(v) for node, v in self.applied_loads.items()}
        return {**out, "balancedness": {str(layer): b for layer, b in self.balancedness.items()},
                "node_loads": {node: list(v) for node, v in self.node_loads.items()},
                "moved": self.moved, "window_tokens": self.window_tokens, **self.extra}

    def planned_fractions(self) -> dict[str, float]:
        """Each expert node's fraction of the routed tokens in the plan (summed over layers); {} before traffic."""
        return _fractions(self.node_loads)

    def applied_fractions(self) -> dict[str, float]:
        """Each expert node's fraction under the shares written (stragglers given less); {} when as planned."""
        return _fractions(self.applied_loads)


def _fractions(node_loads: Mapping[str, tuple[float, ...]]) -> dict[str, float]:
    loads = {node: sum(per_layer) for node, per_layer in node_loads.items()}
    total = sum(loads.values())
    return {node: load / total for node, load in loads.items()} if total > 0 else {}


@dataclass(frozen=True)
class PlacementRecord:
    """The placement under ``placement``: per logical expert, the expert nodes holding its replicas."""

    version: int
    layers: Mapping[int, Mapping[int, tuple[str, ...]]]  # {MoE layer: {expert: node ids, in preference order}}
    # Per replica the fraction of the expert's tokens it takes (aligned with ``layers``); None: equal shares.
    shares: Mapping[int, Mapping[int, tuple[float, ...]]] | None = None
    stats: PlacementStats | None = None
    extra: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    _FIELDS = ("version", "layers", "shares", "stats")

    @classmethod
    def from_json(cls, value: object) -> "PlacementRecord":
        """Check a placement read from etcd; ValueError names the bad field."""
        placement = check_placement(value)  # type: ignore[arg-type]
        layers = {_key("placement layer", layer): MappingProxyType(
                      {_key(f"placement layer {layer!r} expert", e): tuple(nodes) for e, nodes in experts.items()})
                  for layer, experts in placement["layers"].items()}
        shares = placement.get("shares")
        if shares is not None:
            shares = MappingProxyType({int(layer): MappingProxyType({int(e): tuple(f) for e, f in experts.items()})
                                       for layer, experts in shares.items()})  # keys checked with layers
        stats = placement.get("stats")
        return cls(placement["version"], MappingProxyType(layers), shares,
                   None if stats is None else PlacementStats.from_json(stats),
                   MappingProxyType({k: v for k, v in placement.items() if k not in cls._FIELDS}))

    def to_json(self) -> dict:
        out: dict = {"version": self.version, "layers": _nested_json(self.layers)}
        if self.shares is not None:
            out["shares"] = _nested_json(self.shares)
        if self.stats is not None:
            out["stats"] = self.stats.to_json()
        return {**out, **self.extra}

    def node_ids(self) -> list[str]:
        """Every expert node holding a replica, sorted."""
        return sorted({n for experts in self.layers.values() for nodes in experts.values() for n in nodes})

    def in_placement(self, node_id: str) -> bool:
        return any(node_id in nodes for experts in self.layers.values() for nodes in experts.values())

    def assignment(self, node_id: str) -> dict[int, tuple[int, ...]]:
        """{MoE layer: sorted expert ids} whose replicas this placement gives ``node_id``; layers in order."""
        out = {layer: tuple(sorted(e for e, nodes in experts.items() if node_id in nodes))
               for layer, experts in sorted(self.layers.items())}
        return {layer: ids for layer, ids in out.items() if ids}

    def planned_nodes(self) -> set[str]:
        """The nodes the leader planned over (also those that got no replica); without stats, those named."""
        if self.stats is not None and self.stats.nodes is not None:
            return set(self.stats.nodes)
        return set(self.node_ids())

    def share_of(self, layer: int, expert: int) -> tuple[float, ...]:
        """Each replica's fraction of the logical expert's tokens (equal when the placement gives none)."""
        nodes = self.layers[layer][expert]
        given = (self.shares or {}).get(layer, {}).get(expert)
        return given if given is not None else tuple(1.0 / len(nodes) for _ in nodes)


def _nested_json(layers: Mapping[int, Mapping[int, tuple]]) -> dict:
    return {str(layer): {str(e): list(v) for e, v in experts.items()} for layer, experts in layers.items()}
