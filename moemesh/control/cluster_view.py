"""A process's view of the cluster: typed node records, the placement and the leader, from etcd watch events.

The one view every role keeps (the router's control plane and Inference service, attention nodes, expert
nodes). Pure state, no I/O: feed it the typed events of ``Registry.watch_cluster`` (see
``moemesh/control/events.py``) and ask it questions in the mesh's vocabulary:

* which **physical replicas** (copies of a **logical expert** ``(layer, expert)``) the current
  **placement version** gives a node (:meth:`ClusterView.assignment`);
* which attention nodes still route by an older version (:meth:`ClusterView.attention_behind`): an expert
  node drops a replica only once none does;
* the placement as addresses, once every expert node it names has loaded its share
  (:meth:`ClusterView.serving_placement`): an attention node switches to it then.
"""

from __future__ import annotations

from collections.abc import Iterable

from moemesh.control.events import ClusterEvent, LeaderChanged, NodeChanged, NodeDown, NodeUp, PlacementChanged
from moemesh.control.placement import Placement
from moemesh.control.records import NodeRecord, PlacementRecord


def attention_behind(records: Iterable[NodeRecord], version: int) -> list[str]:
    """Ids of the attention node ``records`` that may still route by a placement older than ``version``.

    Those ready or draining whose record names an older ``placement_version``. A node still loading will
    start on the newest; one without a version follows no placement (static ``--expert-nodes``).
    """
    return sorted(r.id for r in records
                  if r.serving and r.placement_version is not None and r.placement_version < version)


class ClusterView:
    def __init__(self):
        self.nodes: dict[tuple[str, str], NodeRecord] = {}  # (role, id) -> record
        self.placement: PlacementRecord | None = None
        self.leader: str | None = None
        self.synced = False  # set by the feeder once a snapshot of etcd has been applied

    def apply(self, ev: ClusterEvent) -> bool:
        """Apply one event; True when something changed."""
        if isinstance(ev, LeaderChanged):
            changed, self.leader = ev.leader != self.leader, ev.leader
        elif isinstance(ev, PlacementChanged):
            changed, self.placement = ev.placement != self.placement, ev.placement
        elif isinstance(ev, NodeDown):
            changed = self.nodes.pop((ev.role, ev.node_id), None) is not None
        elif isinstance(ev, (NodeUp, NodeChanged)):
            key = (ev.record.role, ev.record.id)
            changed = self.nodes.get(key) != ev.record
            self.nodes[key] = ev.record
        else:
            raise TypeError(f"not a cluster event: {ev!r}")
        return changed

    # ---- nodes ---------------------------------------------------------------------------------
    def node(self, role: str, node_id: str) -> NodeRecord | None:
        return self.nodes.get((role, node_id))

    def records(self, role: str | None = None) -> list[NodeRecord]:
        """Node records (of one role), sorted by (role, id)."""
        return [r for (ro, _), r in sorted(self.nodes.items()) if role is None or ro == role]

    def ready_attention_nodes(self) -> list[NodeRecord]:
        return [r for r in self.records("attn") if r.status == "ready" and r.address]

    def attention_behind(self, version: int) -> list[str]:
        return attention_behind(self.records("attn"), version)

    # ---- the placement -------------------------------------------------------------------------
    @property
    def placement_version(self) -> int:
        return self.placement.version if self.placement else 0

    def in_placement(self, node_id: str) -> bool:
        return self.placement is not None and self.placement.in_placement(node_id)

    def assignment(self, node_id: str) -> dict[int, tuple[int, ...]]:
        """{MoE layer: sorted expert ids} the current placement gives ``node_id`` ({} without one)."""
        return self.placement.assignment(node_id) if self.placement else {}

    def serving_placement(self) -> Placement | None:
        """The placement as addresses, once every expert node it names is ready hosting its share."""
        placement = self.placement
        if placement is None:
            return None
        ids = placement.node_ids()
        records = [self.node("expert", node_id) for node_id in ids]
        if not ids or any(r is None or r.status != "ready" for r in records):
            return None
        if any((r.placement_version or 0) < placement.version for r in records):
            return None  # that node has not finished applying this version (its experts list may be stale)
        for node_id, record in zip(ids, records):
            hosted = {(layer, e) for layer, es in record.hosted().items() for e in es}
            wanted = {(layer, e) for layer, es in placement.assignment(node_id).items() for e in es}
            if not wanted <= hosted:
                return None  # that node has not loaded its share of this version yet
        index = {node_id: i for i, node_id in enumerate(ids)}
        replicas = {(layer, expert): tuple(index[n] for n in nodes)
                    for layer, experts in placement.layers.items() for expert, nodes in experts.items()}
        shares = {(layer, expert): tuple(float(f) for f in fractions)
                  for layer, experts in (placement.shares or {}).items() for expert, fractions in experts.items()}
        return Placement(tuple(r.address for r in records), replicas, placement.version, shares)
