"""Failure domains in the planner: replicas span zones when the slots allow, the plan names zones whose loss
would leave experts unhosted, re-plans restore the rule with the fewest moves."""

from __future__ import annotations

import pytest

from moemesh.router.planner import PlanError, plan_placement
from moemesh.router.zones import exposure, rule_applies, spans_zones, zone_index

TWO_ZONES = ["a", "a", "b", "b"]


def _nodes(plan):
    return [[[r.node for r in reps] for reps in layer.replicas] for layer in plan.layers]


def test_zone_index_and_rule():
    assert zone_index(None, 3) is None and zone_index(["a", "a", "a"], 3) is None  # one zone: nothing to spread
    assert zone_index(["x", "y", "x"], 3) == [0, 1, 0]
    assert zone_index([None, None, "x"], 3) == [0, 1, 2]  # a node without a zone is a zone of its own
    with pytest.raises(ValueError, match="2 zones for 3 nodes"):
        zone_index(["a", "b"], 3)
    assert rule_applies([0, 0, 1, 1], 2, 4, 2) and not rule_applies([0, 0, 1, 1], 1, 4, 2)  # needs the floor
    assert not rule_applies([0, 0, 0, 1], 2, 4, 2)  # 2 slots outside zone 0 for 4 experts
    assert spans_zones([0, 2], [0, 0, 1, 1]) and not spans_zones([0, 1], [0, 0, 1, 1])
    assert exposure(((0, 1), (0, 2), (3,)), [0, 0, 1, 1]) == {0: [0], 1: [2]}


def test_fresh_replicas_span_both_zones():
    # without zones the pack pairs nodes 0+1 and 2+3, so a zone {0, 1} would take experts 0 and 2 with it
    assert _nodes(plan_placement([[1, 1, 1, 1]], 4, 2)) == [[[0, 1], [2, 3], [0, 1], [2, 3]]]
    plan = plan_placement([[1, 1, 1, 1]], 4, 2, zones=TWO_ZONES)
    assert _nodes(plan) == [[[0, 2], [1, 3], [0, 2], [1, 3]]]
    assert plan.warnings == () and plan.layers[0].balancedness == 1.0
    assert plan.to_json()["warnings"] == []


def test_the_plan_says_when_losing_a_zone_would_leave_experts_unhosted():
    plan = plan_placement([[1, 1, 1, 1]], 4, 2, zones=["a", "a", "a", "b"])  # 2 slots outside zone a
    assert _nodes(plan) == [[[0, 3], [1, 3], [0, 2], [1, 2]]]  # as many as fit span both zones
    assert plan.warnings == ("losing zone a would leave experts unhosted (layer 0: experts 2-3): the nodes outside "
                             "it have 2 slots per layer for 4 experts; add slots or nodes in other zones",)
    one_each = plan_placement([[1, 1, 1, 1]], 4, 1, zones=TWO_ZONES)  # 4 slots: one replica each
    assert [w.split(" (")[0] for w in one_each.warnings] == ["losing zone a would leave experts unhosted",
                                                             "losing zone b would leave experts unhosted"]


def test_a_replan_restores_the_zone_rule_with_the_fewest_moves():
    previous = [[[0, 1], [0, 1], [2, 3], [2, 3]]]  # every expert inside one zone
    assert plan_placement([[1, 1, 1, 1]], 4, 2, previous).moved == 0  # without zones: nothing to fix
    plan = plan_placement([[1, 1, 1, 1]], 4, 2, previous, zones=TWO_ZONES)
    assert all(spans_zones(nodes, [0, 0, 1, 1]) for nodes in _nodes(plan)[0])
    assert plan.moved == 4 and plan.warnings == ()  # each expert needs one replica in the other zone: 4 at least
    again = plan_placement([[1, 1, 1, 1]], 4, 2, _nodes(plan), zones=TWO_ZONES)
    assert again.moved == 0 and _nodes(again) == _nodes(plan)


def test_a_zone_per_node_is_required():
    with pytest.raises(PlanError, match="3 zones for 4 nodes"):
        plan_placement([[1, 1]], 4, 1, zones=["a", "b", "c"])
