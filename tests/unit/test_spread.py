"""The initial expert placement (pure): exact outputs, coverage and balance, errors naming the problem."""

from __future__ import annotations

from collections import Counter

import pytest

from moemesh.router.spread import SpreadError, placement_dict, placement_problem, spread_experts


def test_contiguous_ranges_without_slots():
    assert spread_experts([1, 2], 4, ["b", "a"], None) == {
        1: {0: ["a"], 1: ["a"], 2: ["b"], 3: ["b"]},
        2: {0: ["a"], 1: ["a"], 2: ["b"], 3: ["b"]},
    }


def test_uneven_split_gives_the_first_nodes_one_more():
    assert spread_experts([3], 7, ["x", "y", "z"], None) == {
        3: {0: ["x"], 1: ["x"], 2: ["x"], 3: ["y"], 4: ["y"], 5: ["z"], 6: ["z"]}}


def test_exact_fit_has_no_replicas():
    assert spread_experts([1], 4, ["a", "b"], 2) == {1: {0: ["a"], 1: ["a"], 2: ["b"], 3: ["b"]}}


def test_double_capacity_replicates_every_expert_on_the_other_node():
    assert spread_experts([1], 4, ["a", "b"], 4) == {1: {0: ["a", "b"], 1: ["a", "b"], 2: ["b", "a"], 3: ["b", "a"]}}


def test_partial_replication_fills_spare_slots_evenly():
    got = spread_experts([1], 8, ["a", "b", "c"], 4)
    assert got == {1: {0: ["a", "c"], 1: ["a", "b"], 2: ["a", "c"], 3: ["b", "a"], 4: ["b"], 5: ["b"], 6: ["c"],
                       7: ["c"]}}
    assert Counter(n for ids in got[1].values() for n in ids) == {"a": 4, "b": 4, "c": 4}


def test_more_nodes_than_experts_puts_replicas_on_the_idle_nodes():
    assert spread_experts([1], 2, ["a", "b", "c", "d"], 1) == {1: {0: ["a", "c"], 1: ["b", "d"]}}


def test_full_capacity_puts_every_expert_on_every_node_once():
    assert spread_experts([1], 3, ["a", "b", "c"], 3) == {1: {0: ["a", "b", "c"], 1: ["b", "c", "a"],
                                                             2: ["c", "a", "b"]}}
    assert spread_experts([1], 3, ["a", "b", "c"], 50) == spread_experts([1], 3, ["a", "b", "c"], 3)


@pytest.mark.parametrize("n_experts, n_nodes, slots", [(64, 3, None), (64, 3, 30), (64, 5, 64), (7, 4, 3),
                                                        (256, 8, 40), (5, 9, 2)])
def test_invariants(n_experts, n_nodes, slots):
    nodes = [f"expert-{i}" for i in range(n_nodes)]
    got = spread_experts([1, 2, 5], n_experts, nodes, slots)
    assert list(got) == [1, 2, 5] and got[1] == got[2] == got[5]
    row = got[1]
    assert sorted(row) == list(range(n_experts))
    assert all(ids and len(set(ids)) == len(ids) for ids in row.values())  # >= 1 replica, never twice on a node
    per_node = Counter(n for ids in row.values() for n in ids)
    if slots is not None:
        assert max(per_node.values()) <= slots
        assert sum(per_node.values()) == min(n_nodes * slots, n_nodes * n_experts)  # every spare slot used
    primaries = Counter(ids[0] for ids in row.values())
    assert max(primaries.values()) - min(primaries.get(n, 0) for n in nodes) <= 1
    copies = [len(ids) for ids in row.values()]
    assert max(copies) - min(copies) <= 1  # replicas spread over experts before any gets another copy


def test_errors_name_the_problem():
    with pytest.raises(SpreadError, match="no expert nodes"):
        spread_experts([1], 4, [], None)
    with pytest.raises(SpreadError, match=r"each node needs >= 3 slots, or start >= 4 expert nodes"):
        spread_experts([1], 8, ["a", "b", "c"], 2)
    with pytest.raises(SpreadError, match="distinct"):
        spread_experts([1], 4, ["a", "a"], None)
    with pytest.raises(SpreadError, match="moe_layers is empty"):
        spread_experts([], 4, ["a"], None)
    with pytest.raises(SpreadError, match="n_experts"):
        spread_experts([1], 0, ["a"], None)
    with pytest.raises(SpreadError, match="slots_per_node"):
        spread_experts([1], 4, ["a"], 0)


def test_placement_dict_is_the_etcd_schema():
    assert placement_dict(3, spread_experts([1, 2], 2, ["a", "b"], None)) == {
        "version": 3, "layers": {"1": {"0": ["a"], "1": ["b"]}, "2": {"0": ["a"], "1": ["b"]}}}


def test_placement_problem():
    p = placement_dict(1, spread_experts([1, 2], 4, ["a", "b"], None))
    assert placement_problem(p, [1, 2], 4, ["a", "b", "c"]) is None
    assert placement_problem(None, [1, 2], 4, ["a"]) == "there is no placement yet"
    assert placement_problem(p, [1, 2], 4, ["a"]) == "it names expert nodes that are gone: b"
    assert placement_problem(p, [1, 2, 3], 4, ["a", "b"]) == "MoE layer 3 is not placed"
    assert placement_problem(p, [1, 2], 5, ["a", "b"]) == "expert 4 of MoE layer 1 has no replica"
    assert placement_problem({"version": -1}, [1], 4, ["a"]).startswith("the placement is malformed")
