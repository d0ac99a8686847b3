"""Zones end to end, the pure parts: ClusterStatus's zone warnings (router/zone_status.py), `moemesh status`'s
zone lines (moemesh/cli/status.py), `moemesh up --expert-zones` (moemesh/cli/up_zones.py) and expert-node's
MOEMESH_ZONE default. Exact outputs."""

from __future__ import annotations

import argparse
from types import MappingProxyType

import pytest

from moemesh.cli.expert_node import zone_from
from moemesh.cli.flags import UsageError
from moemesh.cli.status import format_status, zone_loss
from moemesh.cli.up_zones import check_zones, parse_zones, zone_loss_warning, zone_of_expert
from moemesh.control.records import Capacity, NodeRecord, PlacementRecord
from moemesh.router.zone_status import n_experts_of, placement_zone_warnings


def _expert(node_id: str, zone: str | None, slots: int | None = 4) -> NodeRecord:
    return NodeRecord(node_id, "expert", f"h:{node_id[-1]}", "ready", experts={}, zone=zone,
                      capacity=Capacity(moe_layers=(1, 2), n_routed_experts=4, slots=slots))


def _placement(layer1: dict[int, tuple[str, ...]], layer2: dict[int, tuple[str, ...]] | None = None) -> PlacementRecord:
    layers = {1: MappingProxyType(layer1), 2: MappingProxyType(layer2 or layer1)}
    return PlacementRecord(5, MappingProxyType(layers))


# ---- router/zone_status.py -------------------------------------------------------------------------------------
SPANNING = {0: ("e0", "e1"), 1: ("e1", "e2"), 2: ("e2", "e3"), 3: ("e3", "e0")}  # zones a: e0 e2, b: e1 e3


def test_no_warning_when_every_expert_spans_two_zones():
    nodes = [_expert("e0", "a"), _expert("e1", "b"), _expert("e2", "a"), _expert("e3", "b")]
    assert placement_zone_warnings(_placement(SPANNING), nodes) == ()


def test_warns_with_real_layer_ids_and_what_to_add():
    nodes = [_expert("e0", "a"), _expert("e1", "a"), _expert("e2", "a"), _expert("e3", "b")]
    # zone a holds both replicas of experts 0 and 1 in every layer; e3 (zone b) has 4 slots for 4 experts
    assert placement_zone_warnings(_placement(SPANNING), nodes) == (
        "losing zone a would leave experts unhosted (layers 1-2: experts 0-1): every expert needs 2 replicas "
        "(nodes x slots >= 2 x experts); add slots or nodes in other zones",)
    small = [_expert("e0", "a", 2), _expert("e1", "a", 2), _expert("e2", "a", 2), _expert("e3", "b", 2)]
    assert placement_zone_warnings(_placement(SPANNING), small) == (
        "losing zone a would leave experts unhosted (layers 1-2: experts 0-1): the nodes outside it have 2 slots "
        "per layer for 4 experts; add slots or nodes in other zones",)


def test_only_live_nodes_count_and_one_zone_left_has_no_zone_warning():
    # e0 and e2 (zone a) are gone: the zone check is over zone b alone, which is no failure domain to spread over
    assert placement_zone_warnings(_placement(SPANNING), [_expert("e1", "b"), _expert("e3", "b")]) == ()
    # e2 gone: expert 1 is on e1 only (zone b) and expert 2 on e3 only (b); zone a (e0) holds nothing alone
    warnings = placement_zone_warnings(_placement(SPANNING), [_expert("e0", "a"), _expert("e1", "b"),
                                                             _expert("e3", "b")])
    assert [w.split(": ")[0] for w in warnings] == [
        "losing zone b would leave experts unhosted (layers 1-2"]
    assert "experts 1-2" in warnings[0]


def test_no_zones_no_placement_nodes_without_zone_count_alone():
    nodes = [_expert("e0", None), _expert("e1", None)]  # no zone named: the expert-node loss line says it all
    assert placement_zone_warnings(_placement({0: ("e0",), 1: ("e1",), 2: ("e0",), 3: ("e1",)}), nodes) == ()
    assert placement_zone_warnings(None, [_expert("e0", "a"), _expert("e1", "b")]) == ()
    # a node without a zone is a zone of its own: e1's experts have one replica, so its loss is named
    warnings = placement_zone_warnings(_placement({0: ("e0",), 1: ("e1",), 2: ("e0",), 3: ("e1",)}),
                                       [_expert("e0", "a"), _expert("e1", None)])
    assert [w.split(" (")[0] for w in warnings] == ["losing zone a would leave experts unhosted",
                                                    "losing zone of node 1 would leave experts unhosted"]


def test_n_experts_from_capacity_else_placement():
    assert n_experts_of(_placement(SPANNING), [_expert("e0", "a")]) == 4
    bare = NodeRecord("e0", "expert", "h:0", "ready")
    assert n_experts_of(_placement({0: ("e0",), 6: ("e0",)}), [bare]) == 7


# ---- moemesh status --------------------------------------------------------------------------------------------
def _node(node_id: str, zone: str, experts: list[int], status: str = "ready") -> dict:
    return {"id": node_id, "role": "expert", "address": "h:1", "status": status, "zone": zone,
            "experts": [{"layer": 1, "experts": experts}]}


def test_zone_loss_lines():
    assert zone_loss({"nodes": [_node("e0", "", [0, 1]), _node("e1", "", [0, 1])]}) is None
    spread = {"nodes": [_node("e0", "a", [0, 1]), _node("e1", "b", [0, 1])]}
    assert zone_loss(spread) == "survivable (zone a, zone b)"
    exposed = {"nodes": [_node("e0", "a", [0, 1]), _node("e1", "a", [2]), _node("e2", "b", [1, 2]),
                         _node("e3", "b", [3], status="draining")]}
    assert zone_loss(exposed) == "NOT survivable (losing zone a would lose layer 1: experts 0)"
    alone = {"nodes": [_node("e0", "b", [0, 1]), _node("e1", "b", [0, 1])]}
    assert zone_loss(alone) == "NOT survivable (every serving expert node is in zone b)"
    mixed = {"nodes": [_node("e0", "a", [0, 1]), _node("e1", "", [0, 1])]}
    assert zone_loss(mixed) == "survivable (node e1, zone a)"


def test_format_status_shows_zones_and_the_routers_warnings():
    status = {"placement_version": 2, "leader": "r", "nodes": [_node("e0", "a", [0, 1]), _node("e1", "b", [1])],
              "zone_warnings": ["losing zone a would leave experts unhosted (layer 1: experts 0): ..."]}
    lines = format_status(status).splitlines()
    assert lines[2:4] == ["  one zone loss: NOT survivable (losing zone a would lose layer 1: experts 0)",
                          "  warning: losing zone a would leave experts unhosted (layer 1: experts 0): ..."]
    assert "ready     v0    zone a, 2 experts, planned load" in lines[4]
    assert "zone" not in format_status({"nodes": [_node("e0", "", [0])]}).split("one expert-node loss")[1]


# ---- moemesh up --expert-zones ---------------------------------------------------------------------------------
def test_parse_and_check_zones():
    assert parse_zones("a, b,c") == ["a", "b", "c"]
    for bad in ("a,,b", "a,a", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_zones(bad)
    check_zones(["a", "b"], 2)
    check_zones(None, 1)
    with pytest.raises(UsageError, match="--expert-zones names 3 zones for --expert-nodes 2"):
        check_zones(["a", "b", "c"], 2)


def test_round_robin_also_for_nodes_added_later():
    assert [zone_of_expert(f"expert-{i}", ["a", "b"]) for i in range(5)] == ["a", "b", "a", "b", "a"]
    assert zone_of_expert("expert-3", None) is None


def test_zone_loss_warning_at_start():
    # 16 experts on 4 nodes in zones a, b, a, b: the 2 nodes outside a zone need 8 slots each
    assert zone_loss_warning(16, 4, 8, ["a", "b"], True) is None
    assert zone_loss_warning(16, 3, 11, ["a", "b"], True) == (  # a: 2 nodes, b: 1 (11 slots outside a)
        "--expert-zones a,b on 3 expert nodes: losing one zone stops service (the expert nodes outside zone a "
        "have 11 slots per MoE layer for 16 experts); raise --expert-slots or --expert-nodes")
    assert zone_loss_warning(16, 4, 7, ["a", "b"], True) == (
        "--expert-zones a,b on 4 expert nodes: losing one zone stops service (4 x 7 slots hold fewer than 2 "
        "replicas of each of 16 experts); raise --expert-slots or --expert-nodes")
    assert "each expert has one replica" in zone_loss_warning(16, 4, 8, ["a", "b"], False)
    assert zone_loss_warning(16, 4, 8, ["a"], True) is None and zone_loss_warning(16, 4, 8, None, True) is None


def test_expert_node_zone_flag_then_env():
    args = argparse.Namespace(zone=None)
    assert zone_from(args, {"MOEMESH_ZONE": " rack-2 "}) == "rack-2"
    assert zone_from(args, {"MOEMESH_ZONE": ""}) is None  # a label the node lacks: no zone
    assert zone_from(args, {}) is None
    assert zone_from(argparse.Namespace(zone="a"), {"MOEMESH_ZONE": "b"}) == "a"
