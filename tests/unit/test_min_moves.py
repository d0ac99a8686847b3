"""Minimal-move re-plans (router/min_moves.py through plan_placement): exact outputs, brute force on small cases,
and the issue's figure (Zipf loads drifted by lognormal noise: >= 0.97 balance moving <= 20% of a fresh plan)."""

from __future__ import annotations

import itertools
import random

import pytest

from moemesh.router import planner
from moemesh.router.greedy_moves import greedy_holders
from moemesh.router.min_moves import min_move_holders
from moemesh.router.planner import _evaluate, plan_placement, redundancy_floor

EXACT = 120.0  # seconds: the program always finishes in tests, so results never depend on the machine's speed


def _nodes(plan):
    return [[[r.node for r in reps] for reps in layer.replicas] for layer in plan.layers]


def _zipf(n_experts: int, seed: int) -> list[float]:
    ranks = list(range(n_experts))
    random.Random(seed).shuffle(ranks)
    return [1000.0 / (ranks[e] + 1) for e in range(n_experts)]


def test_resharing_that_suffices_moves_nothing_even_when_a_fresh_plan_is_more_balanced():
    # expert 0 on nodes 0 and 1, expert 1 on 1, expert 2 on 0: expert 0 splits 2.5 | 3.5, both nodes carry 4.5
    previous = [[[0, 1], [1], [0]]]
    plan = plan_placement([[6, 1, 2]], 2, 2, previous, time_limit_s=EXACT)
    assert plan.moved == 0 and _nodes(plan) == previous and plan.layers[0].kept_previous
    assert plan.layers[0].balancedness == pytest.approx(1.0)
    # a drift that re-sharing still absorbs above the target: nothing moves, though moving would gain
    previous = [[[0], [1], [0], [1]]]
    plan = plan_placement([[10, 9, 1, 1]], 2, 2, previous, min_balance=0.95, time_limit_s=EXACT)
    assert plan.moved == 0 and plan.layers[0].balancedness == pytest.approx(10.5 / 11)


def test_the_fewest_moves_reach_the_target_and_an_unreachable_one_falls_back_to_the_best_known():
    previous = [[[0], [0], [1], [1]]]  # 10 + 9 | 1 + 1: balancedness 10.5 / 19
    plan = plan_placement([[10, 9, 1, 1]], 2, 2, previous, min_balance=0.95, time_limit_s=EXACT)
    assert sorted(plan.layers[0].node_loads) == [10.0, 11.0]  # one of 10 and 9 swaps with a 1: two moves
    assert plan.moved == 2 and plan.layers[0].balancedness == pytest.approx(10.5 / 11)
    # 1.0 is out of reach (11 | 10 is the best split): the target becomes the fresh plan's 10.5 / 11
    best = plan_placement([[10, 9, 1, 1]], 2, 2, previous, min_balance=1.0, time_limit_s=EXACT)
    assert best.moved == 2 and best.layers[0].balancedness == pytest.approx(10.5 / 11)


def _brute_force(loads, previous, n_nodes, slots, target):
    """Fewest moves over every placement within the slots meeting ``target``; None when none does."""
    floor = redundancy_floor(len(loads), n_nodes, slots)
    subsets = [s for k in range(floor, n_nodes + 1) for s in itertools.combinations(range(n_nodes), k)]
    best = None
    for holders in itertools.product(subsets, repeat=len(loads)):
        if max(sum(n in h for h in holders) for n in range(n_nodes)) > slots:
            continue
        balance = _evaluate(loads, holders, n_nodes)[2]
        if abs(balance - target) < 1e-6:
            return "tie"  # too close to call for the water-filling: skip the case
        if balance > target:
            moves = sum(1 for h, p in zip(holders, previous) for n in h if n not in p)
            best = moves if best is None else min(best, moves)
    return best


def test_meets_the_target_with_the_fewest_moves_whenever_a_plan_within_the_slots_does():
    rng = random.Random(5)
    checked = feasible = 0
    while checked < 40:
        n_nodes, slots = 3, rng.choice([2, 3])
        n_experts = rng.randint(2, min(4, n_nodes * slots))
        loads = [float(rng.choice([0, 1, 2, 5, 9, rng.randint(1, 30)])) for _ in range(n_experts)]
        first = plan_placement([[float(rng.randint(1, 9)) for _ in range(n_experts)]], n_nodes, slots)
        previous = _nodes(first)[0]
        target = rng.choice([0.8, 0.9, 0.95, 0.99])
        best = _brute_force(loads, previous, n_nodes, slots, target)
        if best == "tie":
            continue
        checked += 1
        plan = plan_placement([loads], n_nodes, slots, [previous], min_balance=target, time_limit_s=EXACT)
        if best is None:  # no plan meets it: the planner reaches at least the fresh plan's balance
            assert plan.layers[0].balancedness >= plan_placement([loads], n_nodes, slots).layers[0].balancedness - 1e-9
            continue
        feasible += 1
        assert plan.layers[0].balancedness >= target - 1e-9, (loads, previous, target)
        assert plan.moved == best, (loads, previous, target)
    assert feasible >= 20  # the check is not vacuous


def test_program_says_none_when_no_plan_within_the_slots_meets_the_target():
    # one hot expert, one slot per node: nothing can split it
    assert min_move_holders([9.0, 1.0], ((0,), (1,)), 2, 1, 1, 0.9, time_limit_s=EXACT) is None
    assert min_move_holders([9.0, 1.0], ((0,), (1,)), 2, 2, 1, 0.9, time_limit_s=EXACT) == ((0, 1), (1,))


@pytest.mark.parametrize("n_experts, n_nodes, slots, n_layers", [(64, 8, 9, 4), (256, 32, 10, 2)])
def test_zipf_drift_keeps_097_balance_moving_under_a_fifth_of_a_fresh_plan(n_experts, n_nodes, slots, n_layers):
    loads = [_zipf(n_experts, seed) for seed in range(n_layers)]
    first = plan_placement(loads, n_nodes, slots)
    assert all(layer.balancedness >= 0.995 for layer in first.layers)  # a fresh plan keeps today's balance
    rng = random.Random(12)
    drifted = [[v * rng.lognormvariate(0.0, 0.3) for v in layer] for layer in loads]
    kept = [_evaluate(layer, tuple(map(tuple, prev)), n_nodes)[2] for layer, prev in zip(drifted, _nodes(first))]
    assert min(kept) < 0.97  # re-sharing alone does not reach the target: the re-plan has to move something
    replan = plan_placement(drifted, n_nodes, slots, _nodes(first), time_limit_s=EXACT)
    fresh = plan_placement(drifted, n_nodes, slots)
    assert all(layer.balancedness >= 0.97 for layer in replan.layers)
    assert replan.moved <= 0.2 * fresh.moved


def test_greedy_fallback_swaps_off_the_peak_node_and_stops_when_nothing_lowers_it():
    # node 0 carries 10 + 9, node 1 is full with the ones: the hottest expert swaps with a one (two moves)
    assert greedy_holders([10, 9, 1, 1], ((0,), (0,), (1,), (1,)), 2, 2, 1, 0.95, 10) == ((1,), (0,), (0,), (1,))
    assert greedy_holders([10, 9, 1, 1], ((0,), (0,), (1,), (1,)), 2, 2, 1, 0.95, 1) is None  # over max_moves
    assert greedy_holders([9, 1], ((0,), (1,)), 2, 1, 1, 0.9, 10) is None  # a swap only moves the peak
    assert greedy_holders([1, 1], ((0,), ()), 2, 1, 1, 0.9, 10) is None  # below the floor: a fresh plan's job


def test_the_planner_falls_back_to_greedy_moves_when_the_program_runs_out_of_time(monkeypatch):
    monkeypatch.setattr(planner, "min_move_holders", lambda *args, **kwargs: None)
    plan = plan_placement([[10, 9, 1, 1]], 2, 2, [[[0], [0], [1], [1]]], min_balance=0.95)
    assert _nodes(plan) == [[[1], [0], [0], [1]]] and plan.moved == 2
    # greedy stuck (one slot each, a swap just moves the peak): the fresh plan, relabelled onto the previous
    plan = plan_placement([[9, 1]], 2, 1, [[[0], [1]]], min_balance=0.9)
    assert _nodes(plan) == [[[0], [1]]] and plan.moved == 0


def test_a_plan_budget_splits_evenly_over_the_layers_left(monkeypatch):
    """``budget_s`` bounds the whole plan: each layer's program gets at most an even share of what is left."""
    limits = []

    def record(*args, time_limit_s, **kwargs):
        limits.append(time_limit_s)
        return None  # as if out of time: the planner goes on with its fallback

    monkeypatch.setattr(planner, "min_move_holders", record)
    clock = iter([100.0, 100.0, 103.0, 109.0, 500.0])  # the planner's reads of time.monotonic, in order
    monkeypatch.setattr(planner.time, "monotonic", lambda: next(clock))
    previous = [[[0], [0], [1], [1]]] * 3
    plan_placement([[10, 9, 1, 1]] * 3, 2, 2, previous, min_balance=0.95, budget_s=12.0)
    # 12 s for 3 layers: 4 s each capped at the per-layer 2 s; then (12-3)/2 = 4.5 -> 2; then (12-9)/1 = 3 -> 2
    assert limits == [2.0, 2.0, 2.0]
    limits.clear()
    clock = iter([100.0, 100.0, 111.5, 112.5])
    plan_placement([[10, 9, 1, 1]] * 3, 2, 2, previous, min_balance=0.95, budget_s=12.0, time_limit_s=10.0)
    # 12/3 = 4; (12-11.5)/2 = 0.25; past the deadline: the least useful time, not zero
    assert limits == [4.0, 0.25, planner.MIN_LAYER_TIME_S]
