"""Slot sizing for one expert-node loss (moemesh.control.placement) and the loss exposure `moemesh status` shows."""

from __future__ import annotations

import random

import pytest

from moemesh.control.placement import (SpecError, default_expert_slots, describe_exposure, loss_exposure,
                                       loss_survivable, survivable_slots)
from moemesh.router.planner import plan_placement


@pytest.mark.parametrize("experts, nodes, floor, default", [
    (8, 2, 8, 8),  # two nodes: each must hold every expert (capped: no room beyond that)
    (16, 2, 16, 16),  # the dev overlay's tiny model
    (8, 3, 6, 7),  # ceil(16/3) = 6 (>= ceil(8/2) = 4, the survivors' capacity), + ceil(8/30) = 1
    (256, 4, 128, 135),  # deploy/base: 256 experts on 4 pods; + ceil(64/10) = 7
    (256, 6, 86, 91),  # base + expert-pool-b
    (256, 8, 64, 68),  # ratio-1-4
    (3, 2, 3, 3),
    (1, 2, 1, 1),
])
def test_sizing_exact(experts, nodes, floor, default):
    assert survivable_slots(experts, nodes) == floor
    assert default_expert_slots(experts, nodes) == default
    assert floor >= -(-experts // (nodes - 1))  # at least ceil(E / (N - 1)): the survivors can hold every expert
    assert loss_survivable(experts, nodes, default) and loss_survivable(experts, nodes, floor)
    assert not loss_survivable(experts, nodes, floor - 1)


def test_one_node_cannot_survive_its_loss():
    assert survivable_slots(8, 1) is None
    assert default_expert_slots(8, 1) == 8
    assert not loss_survivable(8, 1, 8)


@pytest.mark.parametrize("experts, nodes", [(0, 2), (8, 0), (True, 2), (8, 2.0)])
def test_sizing_bad_input(experts, nodes):
    with pytest.raises(SpecError, match="must be an integer >= 1"):
        survivable_slots(experts, nodes)


def test_loss_exposure_exact():
    hosted = {"e1": {3: [0, 1, 2], 5: [0]}, "e0": {3: [0, 1, 3], 5: [1]}, "e2": {}}
    assert loss_exposure(hosted) == {"e0": {3: [3], 5: [1]}, "e1": {3: [2], 5: [0]}}
    assert describe_exposure(loss_exposure(hosted)) == (
        "NOT survivable (losing e0 would lose layer 3: experts 3; layer 5: experts 1; "
        "losing e1 would lose layer 3: experts 2; layer 5: experts 0)")
    assert loss_exposure({"a": {1: [0, 1]}, "b": {1: [1, 0]}}) == {}
    assert describe_exposure({}) == "survivable"
    assert describe_exposure({"a": {1: [0, 1, 2, 5]}}) == "NOT survivable (losing a would lose layer 1: experts 0-2,5)"


def test_plans_with_default_slots_survive_any_one_loss():
    """The point of the sizing: the planner, given default slots, leaves no expert on one node only, whatever
    the loads (a hot expert's extra replicas never take a cold expert's second one)."""
    rng = random.Random(14)
    for _ in range(60):
        experts, nodes = rng.randint(1, 40), rng.randint(2, 7)
        loads = [[rng.choice([0.0, rng.random(), 50 * rng.random()]) for _ in range(experts)] for _ in range(2)]
        plan = plan_placement(loads, nodes, default_expert_slots(experts, nodes))
        for layer in plan.layers:
            assert all(len({r.node for r in reps}) >= 2 for reps in layer.replicas), (experts, nodes, loads)
        hosted = {f"n{n}": {l: [e for e, reps in enumerate(layer.replicas) if n in {r.node for r in reps}]
                            for l, layer in enumerate(plan.layers)} for n in range(nodes)}
        assert loss_exposure(hosted) == {}


def test_fewer_slots_than_survivable_leave_experts_exposed():
    plan = plan_placement([[1.0] * 8], 2, 4)  # --expert-slots 4 on 2 nodes: one replica each
    hosted = {f"n{n}": {0: [e for e, reps in enumerate(plan.layers[0].replicas) if reps[0].node == n]}
              for n in range(2)}
    assert loss_exposure(hosted) == {"n0": {0: [0, 2, 4, 6]}, "n1": {0: [1, 3, 5, 7]}}


def test_up_slots_and_its_warning():
    from moemesh.cli.up import expert_slots, loss_warning

    assert [expert_slots(8, n, None) for n in (1, 2, 3, 4)] == [8, 8, 7, 5]
    assert expert_slots(8, 2, 4) == 4 and expert_slots(8, 2, 99) == 8
    assert loss_warning(8, 2, 8, True) is None and loss_warning(8, 3, 6, True) is None
    assert loss_warning(8, 2, 4, True) == ("--expert-slots 4 on 2 expert nodes (8 experts per MoE layer): one "
                                           "expert-node loss stops service; surviving it needs >= 8 slots (the default)")
    assert loss_warning(8, 1, 8, True).startswith("one expert node: its loss stops service")
    assert loss_warning(8, 2, 8, False).startswith("--no-replicas: each expert has one replica")
