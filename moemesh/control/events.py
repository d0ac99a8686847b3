"""Typed cluster events: what a watch on the cluster root means, with key names kept inside moemesh.control.

:class:`ClusterEvents` turns the registry's raw :class:`~moemesh.control.etcd.WatchEvent` (a key and a
decoded JSON value) into one of

* :class:`NodeUp` (a node record appeared), :class:`NodeChanged` (it was rewritten), :class:`NodeDown`
  (it is gone: the node deregistered or its lease expired);
* :class:`PlacementChanged` (the leader wrote a placement version; ``None`` when it was deleted);
* :class:`LeaderChanged` (the router leader's id; ``None`` when nobody leads).

A value that does not parse (bad JSON, a record that fails :meth:`NodeRecord.from_json`) is skipped, so a
view keeps what it had; it is logged once per key until a good value replaces it. Keys under the root
that name nothing above are ignored. Pure, no I/O: ``Registry.watch_cluster`` feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from moemesh.control.keys import Keys
from moemesh.control.records import NodeRecord, PlacementRecord
from moemesh.logs import get_logger

log = get_logger("moemesh.control.events")


@dataclass(frozen=True)
class NodeUp:
    record: NodeRecord


@dataclass(frozen=True)
class NodeChanged:
    record: NodeRecord


@dataclass(frozen=True)
class NodeDown:
    role: str
    node_id: str


@dataclass(frozen=True)
class PlacementChanged:
    placement: PlacementRecord | None


@dataclass(frozen=True)
class LeaderChanged:
    leader: str | None


ClusterEvent = Union[NodeUp, NodeChanged, NodeDown, PlacementChanged, LeaderChanged]


class ClusterEvents:
    """Decodes one watch stream's events (it remembers which nodes it has seen, to tell up from changed)."""

    def __init__(self, keys: Keys):
        self.keys = keys
        self._known: set[tuple[str, str]] = set()
        self._bad: set[str] = set()  # keys whose bad value was logged

    def decode(self, kind: str, key: str, value: object) -> ClusterEvent | None:
        """The typed event for one put/delete of ``key`` (``value``: decoded JSON), or None to skip it."""
        if key == self.keys.leader():
            if kind == "put" and not isinstance(value, str):
                return self._skip(key, "the leader's id is not a JSON string")
            self._bad.discard(key)
            return LeaderChanged(value if kind == "put" else None)
        if key == self.keys.placement():
            try:
                placement = PlacementRecord.from_json(value) if kind == "put" else None
            except (ValueError, TypeError) as exc:
                return self._skip(key, str(exc))
            self._bad.discard(key)
            return PlacementChanged(placement)
        parsed = self.keys.parse_node(key)
        if parsed is None:
            return None
        if kind == "delete":
            self._bad.discard(key)
            self._known.discard(parsed)
            return NodeDown(*parsed)
        try:  # the key names the node: a record that disagrees is taken as the key says
            record = NodeRecord.from_json({**value, "id": parsed[1], "role": parsed[0]} if isinstance(value, dict)
                                          else value)
        except (ValueError, TypeError) as exc:
            return self._skip(key, str(exc))
        self._bad.discard(key)
        if parsed in self._known:
            return NodeChanged(record)
        self._known.add(parsed)
        return NodeUp(record)

    def _skip(self, key: str, error: str) -> None:
        if key not in self._bad:
            self._bad.add(key)
            log.warning("etcd_record_skipped", key=key, error=error,
                        note="the value does not parse; the view keeps what it had")
        return None
