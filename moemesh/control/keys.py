"""Key names and record schemas of the etcd registry: pure, no client (see moemesh/control/etcd.py for the I/O).

Pure modules (the placement code, the cluster view) import these without pulling in the etcd client.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

ROLES = ("attn", "expert")
STATUSES = ("loading", "ready", "draining", "failed")  # failed: cannot apply the placement (see its "error")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _check_name(what: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} must be letters, digits, '.', '_' or '-' (no '/'), "
                         "starting with a letter or digit")
    return name


def check_cluster_name(cluster: str) -> str:
    """A cluster name fit for keys (``/moemesh/<cluster>/``); ValueError saying what is allowed otherwise."""
    return _check_name("cluster name", cluster)


@dataclass(frozen=True)
class Keys:
    """Key names for one cluster; every moemesh key lives under ``root``."""

    cluster: str = "default"

    def __post_init__(self):
        check_cluster_name(self.cluster)

    @property
    def root(self) -> str:
        return f"/moemesh/{self.cluster}/"

    def nodes(self, role: str | None = None) -> str:
        """Prefix of every node record, or of one role's."""
        if role is None:
            return f"{self.root}nodes/"
        return f"{self.root}nodes/{_check_role(role)}/"

    def node(self, role: str, node_id: str) -> str:
        return f"{self.nodes(role)}{_check_name('node id', node_id)}"

    def leader(self) -> str:
        return f"{self.root}leader"

    def placement(self) -> str:
        return f"{self.root}placement"

    def parse_node(self, key: str) -> tuple[str, str] | None:
        """``(role, node_id)`` for a node key of this cluster, else None."""
        prefix = self.nodes()
        if not key.startswith(prefix):
            return None
        parts = key[len(prefix):].split("/")
        if len(parts) != 2 or parts[0] not in ROLES or not _NAME.fullmatch(parts[1]):
            return None
        return parts[0], parts[1]

    def check(self, key: str) -> str:
        """Refuse keys outside this cluster's root (a typo would otherwise write elsewhere)."""
        if not isinstance(key, str) or not key.startswith(self.root):
            raise ValueError(f"etcd key {key!r} is not under {self.root!r}; build keys with Keys({self.cluster!r})")
        return key


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role {role!r} must be one of {', '.join(ROLES)}")
    return role


def check_node_record(record: dict) -> dict:
    """Validate a node record (see the module docstring); return it unchanged."""
    if not isinstance(record, dict):
        raise ValueError(f"node record must be a dict, got {type(record).__name__}")
    for field in ("id", "role", "address", "status"):
        if field not in record:
            raise ValueError(f"node record lacks {field!r}: {record!r}")
    _check_name("node id", record["id"])
    _check_role(record["role"])
    if record["status"] not in STATUSES:
        raise ValueError(f"node status {record['status']!r} must be one of {', '.join(STATUSES)}")
    if not isinstance(record["address"], str) or not record["address"]:
        raise ValueError(f"node address must be 'HOST:PORT', got {record['address']!r}")
    experts = record.get("experts", {})
    if not isinstance(experts, dict) or not all(isinstance(v, list) for v in experts.values()):
        raise ValueError(f"node experts must be {{layer: [expert ids]}}, got {experts!r}")
    json.dumps(record)  # must be JSON (TypeError names the culprit otherwise)
    return record


def check_placement(placement: dict) -> dict:
    """Validate a placement ``{"version": int, "layers": {layer: {expert: [node ids]}}}``.

    Optional: ``"shares"`` (same keys as ``layers``; per replica the fraction of the expert's tokens it
    takes; equal shares when absent) and ``"stats"`` (what the planner expected: balancedness per layer,
    node loads, replicas moved; shown by ``moemesh status``).
    """
    if not isinstance(placement, dict):
        raise ValueError(f"placement must be a dict, got {type(placement).__name__}")
    version = placement.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"placement version must be an int >= 0, got {version!r}")
    layers = placement.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"placement layers must be {{layer: {{expert: [node ids]}}}}, got {layers!r}")
    for layer, experts in layers.items():
        if not isinstance(experts, dict):
            raise ValueError(f"placement layer {layer!r} must map expert -> [node ids], got {experts!r}")
        for expert, nodes in experts.items():
            if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
                raise ValueError(f"placement layer {layer!r} expert {expert!r}: node ids must be a list of "
                                 f"strings, got {nodes!r}")
    shares = placement.get("shares")
    if shares is not None:
        _check_shares(layers, shares)
    json.dumps(placement)
    return placement


def _check_shares(layers: dict, shares: object) -> None:
    """``shares[layer][expert]``: one fraction >= 0 per node of ``layers[layer][expert]``, summing to 1."""
    if not isinstance(shares, dict):
        raise ValueError(f"placement shares must be {{layer: {{expert: [fractions]}}}}, got {shares!r}")
    for layer, experts in shares.items():
        if layer not in layers or not isinstance(experts, dict):
            raise ValueError(f"placement shares name layer {layer!r}, which is not placed")
        for expert, fractions in experts.items():
            nodes = layers[layer].get(expert)
            ok = (isinstance(fractions, list) and nodes is not None and len(fractions) == len(nodes)
                  and all(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 0 for f in fractions)
                  and abs(sum(fractions) - 1.0) < 1e-6)
            if not ok:
                raise ValueError(f"placement shares of layer {layer!r} expert {expert!r} must be one fraction "
                                 f">= 0 per replica node {nodes!r}, summing to 1; got {fractions!r}")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST:PORT`` (an ``http://`` prefix is tolerated) -> ``(host, port)``."""
    text = endpoint.strip()
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme):]
    host, sep, port = text.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"etcd endpoint {endpoint!r} must be HOST:PORT, e.g. 127.0.0.1:2379")
    return host, int(port)
