"""Planner <-> etcd placement records (pure)."""

from __future__ import annotations

import pytest

from moemesh.control.records import NodeRecord, PlacementRecord
from moemesh.router.placement_state import (loads_matrix, placement_problem, placement_record, planned_nodes,
                                            previous_holders, publish_reason, read_placement, version_of)
from moemesh.router.planner import plan_placement


def test_loads_matrix_orders_layers_and_fills_silence_evenly():
    assert loads_matrix({2: [1, 2, 3], 1: [0, 0, 0]}, [1, 2, 5], 3) == [[1, 1, 1], [1, 2, 3], [1, 1, 1]]
    assert loads_matrix({1: [4]}, [1], 3) == [[4, 0, 0]]


def test_record_round_trips_to_previous_holders():
    plan = plan_placement([[6, 1, 1, 0], [1, 1, 1, 1]], 2, 3)
    typed = placement_record(plan, 7, [1, 3], ["a", "b"], "because", 9)
    record = typed.to_json()  # what etcd holds
    assert PlacementRecord.from_json(record) == typed
    assert record["version"] == 7 and sorted(record["layers"]) == ["1", "3"]
    assert record["layers"]["1"]["0"] == ["a", "b"]  # the hot expert is replicated
    assert record["shares"]["1"]["0"] == [r.share for r in plan.layers[0].replicas[0]]
    stats = record["stats"]
    assert stats["reason"] == "because" and stats["nodes"] == ["a", "b"] and stats["window_tokens"] == 9
    assert stats["balancedness"]["1"] == round(plan.layers[0].balancedness, 6)
    assert stats["node_loads"]["a"] == [round(plan.layers[0].node_loads[0], 3), round(plan.layers[1].node_loads[0], 3)]
    holders = previous_holders(typed, [1, 3], 4, ["a", "b"])
    assert holders == [[[r.node for r in reps] for reps in lp.replicas] for lp in plan.layers]
    assert planned_nodes(typed) == {"a", "b"}
    assert planned_nodes(None) == set()
    assert planned_nodes(PlacementRecord.from_json({"version": 1, "layers": {"1": {"0": ["c"]}}})) == {"c"}


def test_previous_holders_drop_gone_nodes_and_renumber():
    record = PlacementRecord.from_json({"version": 1, "layers": {"1": {"0": ["a", "b"], "1": ["b"], "2": ["c"]}}})
    assert previous_holders(record, [1], 3, ["c", "a"]) == [[[1], [], [0]]]
    assert previous_holders(record, [1, 2], 3, ["a"]) is None  # layer 2 was never placed
    assert previous_holders(read_placement({"version": -1})[0], [1], 3, ["a"]) is None
    assert previous_holders(None, [1], 3, ["a"]) is None


def test_publish_only_when_replicas_move_or_shares_change_enough():
    read = PlacementRecord.from_json
    base = {"version": 1, "layers": {"1": {"0": ["a", "b"]}}, "shares": {"1": {"0": [0.5, 0.5]}}}
    same = {**base, "version": 2, "shares": {"1": {"0": [0.52, 0.48]}}}
    assert publish_reason(read(base), read(same)) is None
    shifted = {**base, "version": 2, "shares": {"1": {"0": [0.7, 0.3]}}}
    assert publish_reason(read(base), read(shifted)) == "shares changed by up to 0.200"
    unshared = {"version": 1, "layers": base["layers"]}  # no shares: equal ones
    assert publish_reason(read(unshared), read(shifted)) == "shares changed by up to 0.200"
    moved = {"version": 2, "layers": {"1": {"0": ["a"]}}, "shares": {"1": {"0": [1.0]}}}
    assert publish_reason(read(base), read(moved)) == "replicas moved"
    assert publish_reason(None, read(moved)) == "replicas moved"


def test_placement_problem():
    p = PlacementRecord.from_json(
        {"version": 1, "layers": {str(l): {str(e): ["a" if e < 2 else "b"] for e in range(4)} for l in (1, 2)}})
    assert placement_problem(p, [1, 2], 4, ["a", "b", "c"]) is None
    assert placement_problem(None, [1, 2], 4, ["a"]) == "there is no placement yet"
    assert placement_problem(p, [1, 2], 4, ["a"]) == "it names expert nodes that are gone, draining or unreachable: b"
    assert placement_problem(p, [1, 2, 3], 4, ["a", "b"]) == "MoE layer 3 is not placed"
    assert placement_problem(p, [1, 2], 5, ["a", "b"]) == "expert 4 of MoE layer 1 has no replica"
    assert read_placement({"version": -1})[1].startswith("the placement is malformed")
    assert read_placement({"version": 2, "layers": {"x": {}}}) == (
        None, "the placement is malformed: placement layer 'x' is not an integer")
    assert read_placement(None) == (None, None)
    assert read_placement(p.to_json()) == (p, None)


def test_version_of_reads_malformed_placements_too():
    assert version_of({"version": 4, "layers": "junk"}) == 4
    assert [version_of(v) for v in (None, "x", {"version": True}, {"version": -2}, {})] == [0, 0, 0, 0, 0]


def test_bad_shares_are_refused():
    from moemesh.control.keys import check_placement
    with pytest.raises(ValueError, match="summing to 1"):
        check_placement({"version": 1, "layers": {"1": {"0": ["a", "b"]}}, "shares": {"1": {"0": [0.5, 0.2]}}})
    with pytest.raises(ValueError, match="one fraction"):
        check_placement({"version": 1, "layers": {"1": {"0": ["a", "b"]}}, "shares": {"1": {"0": [1.0]}}})


def test_attention_behind_counts_only_serving_nodes_with_an_older_version():
    from moemesh.control.cluster_view import attention_behind
    fields = [("a", {"status": "ready", "placement_version": 3}), ("b", {"status": "draining", "placement_version": 2}),
              ("c", {"status": "loading"}), ("d", {"status": "ready"}), ("e", {"status": "ready", "placement_version": 4})]
    records = [NodeRecord.from_json({"id": i, "role": "attn", "address": "h:1", **f}) for i, f in fields]
    assert attention_behind(records, 4) == ["a", "b"]
    assert attention_behind(records, 2) == []
