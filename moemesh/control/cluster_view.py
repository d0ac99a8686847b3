"""A node's view of the cluster, built from etcd watch events: node records and the placement.

Pure state (no I/O): feed it :class:`~moemesh.control.etcd.WatchEvent`s from a watch on the
cluster root and ask what this node should host, or which expert nodes serve the
current placement.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from moemesh.control.etcd import Keys, WatchEvent
from moemesh.control.placement import Placement


def attention_behind(records: Iterable[tuple[str, dict[str, Any]]], version: int) -> list[str]:
    """Attention nodes (``(id, record)`` pairs) that may still route by a placement older than ``version``.

    Those ready or draining whose record names an older ``placement_version``. A node still loading will
    start on the newest; one without a version follows no placement (static ``--expert-nodes``).
    """
    return sorted(node_id for node_id, r in records if r.get("status") in ("ready", "draining")
                  and isinstance(r.get("placement_version"), int) and r["placement_version"] < version)


class ClusterView:
    def __init__(self, keys: Keys):
        self.keys = keys
        self.nodes: dict[tuple[str, str], dict[str, Any]] = {}  # (role, id) -> record
        self.placement: dict[str, Any] | None = None
        self.leader: str | None = None

    def apply(self, ev: WatchEvent) -> bool:
        """Apply one event; True when something changed."""
        if ev.key == self.keys.leader():
            new = ev.value if ev.kind == "put" else None
            changed, self.leader = new != self.leader, new
            return changed
        if ev.key == self.keys.placement():
            new = ev.value if ev.kind == "put" else None
            changed, self.placement = new != self.placement, new
            return changed
        parsed = self.keys.parse_node(ev.key)
        if parsed is None:
            return False
        if ev.kind == "delete":
            return self.nodes.pop(parsed, None) is not None
        changed = self.nodes.get(parsed) != ev.value
        self.nodes[parsed] = ev.value
        return changed

    @property
    def placement_version(self) -> int:
        return int(self.placement["version"]) if self.placement else 0

    def records(self, role: str) -> dict[str, dict[str, Any]]:
        return {node_id: r for (ro, node_id), r in self.nodes.items() if ro == role}

    def attention_behind(self, version: int) -> list[str]:
        return attention_behind(self.records("attn").items(), version)

    def in_placement(self, node_id: str) -> bool:
        return any(node_id in nodes for experts in (self.placement or {}).get("layers", {}).values()
                   for nodes in experts.values())

    def assignment(self, node_id: str) -> dict[int, list[int]]:
        """{MoE layer: sorted expert ids} the current placement gives ``node_id``."""
        out: dict[int, list[int]] = {}
        for layer, experts in (self.placement or {}).get("layers", {}).items():
            for expert, nodes in experts.items():
                if node_id in nodes:
                    out.setdefault(int(layer), []).append(int(expert))
        return {layer: sorted(ids) for layer, ids in sorted(out.items())}

    def serving_placement(self) -> Placement | None:
        """The placement as addresses, once every expert node it names is ready hosting its share."""
        if not self.placement:
            return None
        ids = sorted({n for experts in self.placement["layers"].values() for nodes in experts.values() for n in nodes})
        records = [self.nodes.get(("expert", node_id)) for node_id in ids]
        if not ids or any(r is None or r.get("status") != "ready" for r in records):
            return None
        if any(int(r.get("placement_version") or 0) < self.placement_version for r in records):
            return None  # that node has not finished applying this version (its experts list may be stale)
        for node_id, record in zip(ids, records):
            hosted = {(int(layer), e) for layer, es in record.get("experts", {}).items() for e in es}
            wanted = {(layer, e) for layer, es in self.assignment(node_id).items() for e in es}
            if not wanted <= hosted:
                return None  # that node has not loaded its share of this version yet
        index = {node_id: i for i, node_id in enumerate(ids)}
        replicas = {
            (int(layer), int(expert)): tuple(index[n] for n in nodes)
            for layer, experts in self.placement["layers"].items()
            for expert, nodes in experts.items()
        }
        shares = {
            (int(layer), int(expert)): tuple(float(f) for f in fractions)
            for layer, experts in (self.placement.get("shares") or {}).items()
            for expert, fractions in experts.items()
        }
        return Placement(tuple(r["address"] for r in records), replicas, self.placement_version, shares)
