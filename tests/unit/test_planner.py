"""The placement planner (pure): exact outputs on hand-checked cases, invariants, re-plans with a previous placement."""

from __future__ import annotations

import random

import pytest

from moemesh.router.planner import (Plan, PlanError, Replica, _evaluate, _pack, plan_placement,
                                    previous_from_json)

HOT = [465.0] + [1.0] * 31  # expert 0 carries 30x the mean load (496 / 32 = 15.5)


def _nodes(plan: Plan) -> list[list[list[int]]]:
    return [[[r.node for r in reps] for reps in layer.replicas] for layer in plan.layers]


def _check_invariants(plan: Plan, loads: list[list[float]]) -> None:
    n, s = plan.n_nodes, plan.slots_per_node
    assert len(plan.layers) == len(loads)
    for layer, layer_loads in zip(plan.layers, loads):
        assert len(layer.replicas) == len(layer_loads)
        per_node = [0] * n
        node_load = [0.0] * n
        for load, reps in zip(layer_loads, layer.replicas):
            nodes = [r.node for r in reps]
            assert nodes and nodes == sorted(set(nodes))  # >= 1 replica, never two on one node
            assert all(0 <= v < n for v in nodes)
            assert all(r.share >= 0 for r in reps)
            assert sum(r.share for r in reps) == pytest.approx(1.0, abs=1e-12)
            for r in reps:
                per_node[r.node] += 1
                node_load[r.node] += load * r.share
        assert max(per_node) <= s
        assert layer.node_loads == pytest.approx(node_load, abs=1e-9)
        assert sum(layer.node_loads) == pytest.approx(sum(layer_loads))
        peak = max(node_load)
        assert layer.balancedness == pytest.approx(sum(node_load) / n / peak if peak else 1.0, abs=1e-12)


def test_no_spare_slot_packs_hottest_first_onto_least_loaded_node():
    # 5 -> node 0; 3 -> node 1; 2 -> node 1 (3 < 5); 1 -> node 0 (tie 5 = 5: lower index, and node 1 is full)
    plan = plan_placement([[5, 3, 2, 1]], 2, 2)
    layer = plan.layers[0]
    assert layer.replicas == ((Replica(0, 1.0),), (Replica(1, 1.0),), (Replica(1, 1.0),), (Replica(0, 1.0),))
    assert layer.node_loads == (6.0, 5.0)
    assert layer.balancedness == 5.5 / 6
    assert layer.moved == 4 and plan.moved == 4  # no previous placement: every replica is loaded
    assert not layer.kept_previous


def test_perfect_split_without_replication():
    layer = plan_placement([[4, 3, 2, 1]], 2, 2).layers[0]
    assert [[r.node for r in reps] for reps in layer.replicas] == [[0], [1], [1], [0]]
    assert layer.node_loads == (5.0, 5.0) and layer.balancedness == 1.0


def test_spare_slot_replicates_the_hot_expert():
    layer = plan_placement([[6, 1, 1]], 2, 2).layers[0]
    assert layer.replicas == ((Replica(0, 0.5), Replica(1, 0.5)), (Replica(0, 1.0),), (Replica(1, 1.0),))
    assert layer.node_loads == (4.0, 4.0) and layer.balancedness == 1.0
    # without the spare slot: 6 | 1 + 1
    assert plan_placement([[6, 1, 1]], 3, 1).layers[0].balancedness == (8 / 3) / 6


def test_shares_water_fill_around_the_other_experts():
    # expert 0 on both nodes (3 + 3 at first), expert 1 (3) on node 0, expert 2 (1) on node 1:
    # water level (6 + 3 + 1) / 2 = 5 -> expert 0 puts 2 on node 0 and 4 on node 1
    layer = plan_placement([[6, 3, 1]], 2, 2).layers[0]
    assert [[r.node for r in reps] for reps in layer.replicas] == [[0, 1], [0], [1]]
    assert [r.share for r in layer.replicas[0]] == pytest.approx([1 / 3, 2 / 3], abs=1e-15)
    assert layer.node_loads == pytest.approx((5.0, 5.0), abs=1e-12)
    assert layer.balancedness == pytest.approx(1.0, abs=1e-15)


def test_skewed_expert_30x_the_mean_is_replicated_on_every_node():
    no_spare = plan_placement([HOT], 4, 8).layers[0]
    assert no_spare.node_loads == (472.0, 8.0, 8.0, 8.0)  # 465 + 7 ones | 8 ones | 8 ones | 8 ones
    assert no_spare.balancedness == 124 / 472
    spare = plan_placement([HOT], 4, 10).layers[0]  # 8 spare slots
    assert [r.node for r in spare.replicas[0]] == [0, 1, 2, 3]
    assert sum(len(r) for r in spare.replicas) == 40  # every spare slot used
    assert spare.node_loads == pytest.approx((124.0,) * 4, abs=1e-9)
    assert spare.balancedness == pytest.approx(1.0, abs=1e-12)
    _check_invariants(plan_placement([HOT], 4, 10), [HOT])


def test_zero_load_experts_are_not_replicated():
    layer = plan_placement([[0, 0, 0]], 2, 2).layers[0]  # 4 slots < 2 x 3: no redundancy floor
    assert [len(r) for r in layer.replicas] == [1, 1, 1]
    assert layer.balancedness == 1.0
    layer = plan_placement([[0, 0, 0]], 3, 3).layers[0]  # the floor's 2 each, not the hot replicas' 3
    assert [len(r) for r in layer.replicas] == [2, 2, 2]


def test_replicas_of_one_expert_land_on_distinct_nodes():
    """Exact: the redundancy floor puts each expert's 2 replicas on 2 nodes; the spare slots go to the hot one."""
    assert _nodes(plan_placement([[1, 1, 1, 1]], 2, 4)) == [[[0, 1], [0, 1], [0, 1], [0, 1]]]
    plan = plan_placement([[10, 1, 1, 1]], 3, 3)
    assert _nodes(plan) == [[[0, 1, 2], [0, 1], [0, 2], [1, 2]]]
    assert plan.layers[0].balancedness == pytest.approx(1.0)
    # without room for two each (6 slots < 8): one replica each, the spare two to the hot expert
    assert _nodes(plan_placement([[10, 1, 1, 1]], 3, 2)) == [[[0, 1, 2], [0], [1], [2]]]
    assert _nodes(plan_placement([[1, 1, 1, 1]], 2, 4, replicate=False)) == [[[0], [1], [0], [1]]]


def test_a_kept_placement_below_the_redundancy_floor_is_replanned():
    one_node = [[[0], [0], [0], [0]]]
    plan = plan_placement([[1, 1, 1, 1]], 2, 4, previous=one_node)  # a second node joined: replicate onto it
    assert _nodes(plan) == [[[0, 1], [0, 1], [0, 1], [0, 1]]] and not plan.layers[0].kept_previous
    plan = plan_placement([[1, 1, 1, 1]], 1, 4, previous=one_node)  # the survivor of a loss keeps what it has
    assert _nodes(plan) == one_node and plan.moved == 0 and plan.layers[0].kept_previous


def test_pack_frees_a_slot_when_every_free_node_already_holds_the_expert():
    # node 0 takes experts 0 and 1, node 1 expert 2; expert 2's second replica finds node 1 (holding it) as the
    # only free node: expert 0 moves from node 0 to node 1 and expert 2 takes its slot.
    assert _pack([0, 0, 0], [1, 1, 2], 2, 2) == ((1,), (0,), (0, 1))


def test_invariants_and_never_worse_than_no_replication_on_random_cases():
    rng = random.Random(0)
    for _ in range(150):
        n, s = rng.randint(1, 5), rng.randint(1, 5)
        e = rng.randint(1, n * s)
        loads = [[rng.choice([0.0, 1.0, 2.0, 7.0, rng.paretovariate(1.0) * 10]) for _ in range(e)]
                 for _ in range(2)]
        plan = plan_placement(loads, n, s)
        _check_invariants(plan, loads)
        for layer, layer_loads in zip(plan.layers, loads):
            plain = _evaluate(layer_loads, _pack(layer_loads, [1] * e, n, s), n)
            assert layer.balancedness >= plain[2] - 1e-12


def test_deterministic():
    rng = random.Random(7)
    loads = [[rng.paretovariate(1.0) for _ in range(16)] for _ in range(3)]
    assert plan_placement(loads, 4, 5) == plan_placement(loads, 4, 5)
    assert plan_placement(loads, 4, 5).to_json() == plan_placement(loads, 4, 5).to_json()


def _pareto_layers(seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.paretovariate(1.0) for _ in range(16)] for _ in range(2)]


def test_previous_with_the_same_loads_moves_nothing():
    loads = _pareto_layers(0)
    first = plan_placement(loads, 4, 5)
    again = plan_placement(loads, 4, 5, _nodes(first))
    assert again.moved == 0 and all(layer.kept_previous for layer in again.layers)
    assert [layer.replicas for layer in again.layers] == [layer.replicas for layer in first.layers]
    assert [layer.balancedness for layer in again.layers] == [layer.balancedness for layer in first.layers]


def test_previous_with_slightly_changed_loads_changes_shares_only():
    loads = _pareto_layers(0)
    first = plan_placement(loads, 4, 5)
    rng = random.Random(1)
    drifted = [[v * (1 + 0.05 * rng.uniform(-1, 1)) for v in layer] for layer in loads]
    second = plan_placement(drifted, 4, 5, _nodes(first))
    _check_invariants(second, drifted)
    assert second.moved == 0 and _nodes(second) == _nodes(first)
    assert [layer.replicas for layer in second.layers] != [layer.replicas for layer in first.layers]  # shares
    assert min(layer.balancedness for layer in second.layers) > 0.99


def test_previous_with_very_different_loads_moves_the_fewest_replicas():
    first = plan_placement([HOT], 4, 10)
    moved_hot = [list(reversed(HOT))]  # now expert 31 is the hot one, on 2 nodes
    kept = plan_placement(moved_hot, 4, 10, _nodes(first), min_balance=0.01)  # any placement meets 0.01: keep
    assert kept.moved == 0 and kept.layers[0].kept_previous and kept.layers[0].balancedness < 0.5
    second = plan_placement(moved_hot, 4, 10, _nodes(first))
    _check_invariants(second, moved_hot)
    assert not second.layers[0].kept_previous
    # expert 31 (465 of 496 tokens) needs a replica on all 4 nodes to bring the peak to 124 / 0.97 or less;
    # 40 slots < 2 x 32 experts: no redundancy floor, it had one, so exactly 3 move (3 cold replicas of the
    # 8 extra ones of expert 0 make room)
    assert second.moved == 3
    assert [r.node for r in second.layers[0].replicas[31]] == [0, 1, 2, 3]
    assert second.layers[0].balancedness >= 0.97


def test_previous_round_trips_through_json():
    loads = _pareto_layers(3)
    first = plan_placement(loads, 4, 5)
    assert previous_from_json(first.to_json()) == _nodes(first)
    assert plan_placement(loads, 4, 5, previous_from_json(first.to_json())).moved == 0


def test_previous_from_fewer_nodes_is_accepted():
    first = plan_placement([[4, 3, 2, 1]], 2, 2)
    grown = plan_placement([[4, 3, 2, 1]], 3, 2, _nodes(first))
    _check_invariants(grown, [[4, 3, 2, 1]])


@pytest.mark.parametrize("args, message", [
    (([[1, -1]], 1, 2), "must be a finite number >= 0"),
    (([[1, 2], [1]], 1, 2), "ragged loads"),
    (([[1, "x"]], 1, 2), "is not a number"),
    (([[1, True]], 1, 2), "is not a number"),
    (([[1, float("nan")]], 1, 2), "finite"),
    (([], 1, 2), "non-empty"),
    (([[]], 1, 2), "non-empty"),
    (([[1, 2, 3]], 1, 2), "fewer than the 3 experts"),
    (([[1]], 0, 2), "nodes must be an integer >= 1"),
    (([[1]], 1, 0), "slots per node must be an integer >= 1"),
])
def test_bad_input(args, message):
    with pytest.raises(PlanError, match=message):
        plan_placement(*args)


@pytest.mark.parametrize("previous, message", [
    ([[[0], [1]], [[0], [1]]], "has 2 layers"),
    ([[[0], [1], [1]]], "has 3 experts"),
    ([[[0], [2]]], "outside 0..1"),
    ([[[0, 0], [1]]], "twice on one node"),
    ([[[0, 1], [0, 1]]], "more than 1 slots"),
])
def test_bad_previous(previous, message):
    with pytest.raises(PlanError, match=message):
        plan_placement([[1, 2]], 2, 1, previous)


@pytest.mark.parametrize("data, message", [
    ([], "plan's JSON"),
    ({"layers": [{}]}, "no \"replicas\""),
    ({"layers": [{"replicas": {"0": [], "2": []}}]}, "expert ids must be 0..1"),
    ({"layers": [{"replicas": {"0": [{"share": 1.0}]}}]}, "no integer \"node\""),
])
def test_bad_previous_json(data, message):
    with pytest.raises(PlanError, match=message):
        previous_from_json(data)


def test_orphans_of_a_lost_node_go_to_free_slots_and_the_rest_stays():
    # 3 nodes x 2 slots; node 2 left: experts 2 and 3 lost their only replica
    previous = [[[0], [1], [], [], [0, 1]]]
    plan = plan_placement([[4, 4, 3, 1, 2]], 3, 2, previous, min_balance=0.01)
    nodes = [[r.node for r in reps] for reps in plan.layers[0].replicas]
    assert nodes[:2] == [[0], [1]] and nodes[4] == [0, 1]  # kept where they were
    assert sorted(nodes[2] + nodes[3]) == [2, 2]  # the hotter orphan first, both onto the empty node 2
    assert plan.moved == 2 and not plan.layers[0].kept_previous  # kept_previous: nothing moved


def test_orphans_without_free_slots_get_a_fresh_plan():
    # 2 nodes x 2 slots, both full with replicas of experts 0 and 1: expert 2 has nowhere to go
    plan = plan_placement([[1, 1, 1]], 2, 2, [[[0, 1], [0, 1], []]], min_balance=0.01)
    assert all(reps for reps in plan.layers[0].replicas) and not plan.layers[0].kept_previous


def test_replicate_false_keeps_one_replica_per_expert():
    plan = plan_placement([[30, 1, 1, 1]], 2, 4, replicate=False)
    assert [len(reps) for reps in plan.layers[0].replicas] == [1, 1, 1, 1]
    assert len(plan_placement([[30, 1, 1, 1]], 2, 4).layers[0].replicas[0]) == 2


def _zipf(n_experts: int, seed: int) -> list[float]:
    """Zipf s=1: the expert of popularity rank r gets 1/r of the top load; ranks shuffled per layer."""
    ranks = list(range(n_experts))
    random.Random(seed).shuffle(ranks)
    return [1000.0 / (ranks[e] + 1) for e in range(n_experts)]


def test_zipf_skew_is_balanced_and_a_drifted_replan_keeps_balance_while_moving_little():
    experts, nodes, slots = 64, 8, 10  # 80 slots per layer: 25% spare
    loads = [_zipf(experts, seed) for seed in range(4)]
    plan = plan_placement(loads, nodes, slots)
    _check_invariants(plan, loads)
    assert all(layer.balancedness >= 0.995 for layer in plan.layers)
    assert all(layer.balancedness < 0.7 for layer in plan_placement(loads, nodes, slots, replicate=False).layers)

    rng = random.Random(7)
    drifted = [[v * rng.lognormvariate(0.0, 0.3) for v in layer] for layer in loads]  # the next window
    replan = plan_placement(drifted, nodes, slots, _nodes(plan))
    _check_invariants(replan, drifted)
    assert all(layer.balancedness >= 0.97 for layer in replan.layers)
    replicas = sum(len(reps) for layer in replan.layers for reps in layer.replicas)
    assert replan.moved <= 0.1 * replicas
    fresh = plan_placement(drifted, nodes, slots)  # without --previous every replica counts as moved
    assert fresh.moved == sum(len(reps) for layer in fresh.layers for reps in layer.replicas)
