"""Typed etcd records: from_json checks every field and names the bad one; to_json gives back the same JSON."""

from __future__ import annotations

import json

import pytest

from moemesh.control.records import Capacity, NodeRecord, PlacementRecord, PlacementStats

EXPERT = {  # what expert_node/registered.py writes
    "id": "expert-0", "role": "expert", "address": "h:5000", "status": "ready", "experts": {"1": [0, 1], "3": [2]},
    "tls": False, "capacity": {"slots": 4, "moe_layers": [1, 3], "n_routed_experts": 8, "checkpoint": "9f2c"},
    "torch_store": "h:29500", "placement_version": 2, "error": "disk full", "zone": "rack-1",
}
ATTN = {  # what attn_node/serve.py writes
    "id": "attn-0", "role": "attn", "address": "h:6000", "status": "loading", "experts": {}, "tls": True,
    "capacity": {"kv_cache_tokens": 4096, "max_num_seqs": 8},
}
PLACEMENT = {  # what the leader writes
    "version": 3, "layers": {"1": {"0": ["a", "b"], "1": ["b"]}, "3": {"0": ["a"], "1": ["b"]}},
    "shares": {"1": {"0": [0.75, 0.25], "1": [1.0]}, "3": {"0": [1.0], "1": [1.0]}},
    "stats": {"reason": "expert nodes joined: b", "nodes": ["a", "b", "c"], "balancedness": {"1": 0.9, "3": 1.0},
              "node_loads": {"a": [3.0, 1.0], "b": [1.0, 1.0], "c": [0.0, 0.0]}, "moved": 2, "window_tokens": 40},
}


@pytest.mark.parametrize("record", [EXPERT, ATTN, {"id": "a", "role": "attn", "address": "h:1", "status": "ready"},
                                    {**ATTN, "future_field": {"x": [1]}, "capacity": {"kv_cache_tokens": 1, "gpu": "h200"}}])
def test_node_record_round_trips_exactly(record):
    typed = NodeRecord.from_json(record)
    assert typed.to_json() == record
    assert json.dumps(typed.to_json(), sort_keys=True) == json.dumps(record, sort_keys=True)
    assert NodeRecord.from_json(json.loads(json.dumps(typed.to_json()))) == typed


def test_node_record_fields_are_typed():
    r = NodeRecord.from_json(EXPERT)
    assert (r.id, r.role, r.address, r.status, r.placement_version, r.tls) == ("expert-0", "expert", "h:5000",
                                                                                "ready", 2, False)
    assert dict(r.experts) == {1: (0, 1), 3: (2,)}
    assert r.capacity == Capacity(moe_layers=(1, 3), n_routed_experts=8, slots=4, checkpoint="9f2c")
    assert (r.torch_store, r.error, r.serving, r.zone) == ("h:29500", "disk full", True, "rack-1")
    bare = NodeRecord.from_json({"id": "a", "role": "attn", "address": "h:1", "status": "loading"})
    assert (bare.experts, bare.capacity, bare.placement_version, bare.tls, bare.serving) == (None, None, None, None,
                                                                                          False)
    assert bare.hosted() == {}


def test_hosted_sorts_layers_and_ids():
    r = NodeRecord.from_json({**EXPERT, "experts": {"3": [5, 2], "1": [1, 0]}})
    assert r.hosted() == {1: (0, 1), 3: (2, 5)}
    assert list(r.to_json()["experts"]) == ["3", "1"]  # to_json keeps what was written


@pytest.mark.parametrize("change, message", [
    ({"status": "up"}, "node status 'up' must be one of"),
    ({"role": "router"}, "role 'router' must be one of"),
    ({"experts": {"1": 3}}, "node experts must be"),
    ({"experts": {"one": [3]}}, "node experts layer 'one' is not an integer"),
    ({"experts": {"1": [0, "2"]}}, "node experts['1'] id must be an int >= 0, got '2'"),
    ({"placement_version": -1}, "node placement_version must be an int >= 0, got -1"),
    ({"placement_version": True}, "node placement_version must be an int >= 0, got True"),
    ({"tls": "yes"}, "node tls must be a bool, got 'yes'"),
    ({"torch_store": 5}, "node torch_store must be a str, got 5"),
    ({"zone": 1}, "node zone must be a str, got 1"),
    ({"capacity": [4]}, "node capacity must be a JSON object, got [4]"),
    ({"capacity": {"slots": 0}}, "capacity.slots must be an int >= 1, got 0"),
    ({"capacity": {"moe_layers": "1,2"}}, "capacity.moe_layers must be a list of MoE layer indices, got '1,2'"),
    ({"capacity": {"moe_layers": [1, -2]}}, "capacity.moe_layers item must be an int >= 0, got -2"),
    ({"capacity": {"n_routed_experts": 0}}, "capacity.n_routed_experts must be an int >= 1, got 0"),
    ({"capacity": {"checkpoint": 7}}, "capacity.checkpoint must be a str, got 7"),
])
def test_node_record_errors_name_the_field(change, message):
    with pytest.raises(ValueError) as exc:
        NodeRecord.from_json({**EXPERT, **change})
    assert message in str(exc.value)


def test_node_record_refuses_what_is_not_a_record():
    for bad in ("ready", None, ["x"]):
        with pytest.raises(ValueError, match="node record must be a dict"):
            NodeRecord.from_json(bad)
    with pytest.raises(ValueError, match="lacks 'address'"):
        NodeRecord.from_json({"id": "a", "role": "attn", "status": "ready"})


def test_placement_round_trips_exactly():
    for value in (PLACEMENT, {"version": 0, "layers": {}}, {"version": 1, "layers": {"1": {"0": ["a"]}}},
                  {**PLACEMENT, "stats": {"reason": "r", "balancedness": {}, "node_loads": {}, "moved": 0,
                                          "window_tokens": 0}},
                  {**PLACEMENT, "note": "from a newer router", "stats": {**PLACEMENT["stats"], "gain": 0.1}}):
        typed = PlacementRecord.from_json(value)
        assert typed.to_json() == value
        assert PlacementRecord.from_json(json.loads(json.dumps(typed.to_json()))) == typed


def test_placement_questions():
    p = PlacementRecord.from_json(PLACEMENT)
    assert p.version == 3 and dict(p.layers[1]) == {0: ("a", "b"), 1: ("b",)}
    assert p.node_ids() == ["a", "b"]
    assert (p.in_placement("a"), p.in_placement("c")) == (True, False)
    assert p.assignment("a") == {1: (0,), 3: (0,)}
    assert p.assignment("b") == {1: (0, 1), 3: (1,)}
    assert p.assignment("c") == {}
    assert p.planned_nodes() == {"a", "b", "c"}  # the stats name c: planned over, given nothing
    assert p.share_of(1, 0) == (0.75, 0.25)
    bare = PlacementRecord.from_json({"version": 1, "layers": {"1": {"0": ["a", "b"]}}})
    assert (bare.share_of(1, 0), bare.planned_nodes(), bare.stats) == ((0.5, 0.5), {"a", "b"}, None)


def test_placement_stats():
    stats = PlacementRecord.from_json(PLACEMENT).stats
    assert stats == PlacementStats("expert nodes joined: b", ("a", "b", "c"), {1: 0.9, 3: 1.0},
                                   {"a": (3.0, 1.0), "b": (1.0, 1.0), "c": (0.0, 0.0)}, 2, 40)
    assert stats.planned_fractions() == {"a": 4 / 6, "b": 2 / 6, "c": 0.0}
    assert PlacementStats().planned_fractions() == {}
    empty = PlacementStats.from_json({})
    assert (empty.reason, empty.nodes, empty.moved, empty.window_tokens) == ("", None, 0, 0)


@pytest.mark.parametrize("value, message", [
    ({"version": -1, "layers": {}}, "placement version must be an int >= 0"),
    ({"version": 1, "layers": {"x": {}}}, "placement layer 'x' is not an integer"),
    ({"version": 1, "layers": {"1": {"01": ["a"]}}}, "placement layer '1' expert '01' must be an integer >= 0"),
    ({"version": 1, "layers": {"1": {"0": ["a"]}}, "shares": {"1": {"0": [0.5]}}}, "summing to 1"),
    ({**PLACEMENT, "stats": []}, "placement stats must be a JSON object"),
    ({**PLACEMENT, "stats": {"nodes": "a"}}, "placement stats.nodes must be a list of node ids"),
    ({**PLACEMENT, "stats": {"moved": -3}}, "placement stats.moved must be an int >= 0, got -3"),
    ({**PLACEMENT, "stats": {"balancedness": {"1": "high"}}}, "placement stats.balancedness['1'] must be a number"),
    ({**PLACEMENT, "stats": {"node_loads": {"a": 3}}}, "placement stats.node_loads must map node id"),
])
def test_placement_errors_name_the_field(value, message):
    with pytest.raises(ValueError) as exc:
        PlacementRecord.from_json(value)
    assert message in str(exc.value)
