"""The servability verdict (moemesh/control/servability.py) and the missing-expert helpers it rests on: exact outputs."""

from __future__ import annotations

from types import MappingProxyType

import grpc
import pytest

from moemesh.control.placement import Placement, describe_missing, missing_experts
from moemesh.control.records import Capacity, NodeRecord, PlacementRecord
from moemesh.control.servability import (FIX, Servability, judge, live_expert_nodes, min_slots,
                                         placement_servability)
from moemesh.errors import UnservableError
from moemesh.wire.status import NO_RETRY, abort, no_retry, status_for


def _expert(node_id: str, slots: int | None = 4, status: str = "ready") -> NodeRecord:
    return NodeRecord(node_id, "expert", f"h:{node_id[-1]}", status, experts={},
                      capacity=Capacity(moe_layers=(1, 2), n_routed_experts=8, slots=slots))


def _halves() -> PlacementRecord:
    """8 experts in MoE layers 1 and 2: 0-3 on expert-0, 4-7 on expert-1, no replicas."""
    half = {e: ("expert-0",) if e < 4 else ("expert-1",) for e in range(8)}
    return PlacementRecord(3, MappingProxyType({1: MappingProxyType(half), 2: MappingProxyType(half)}))


# ---- missing_experts / describe_missing ----------------------------------------------------------------------
def test_missing_experts_counts_only_live_replicas():
    replicas = {(1, 0): ("a",), (1, 1): ("a", "b"), (1, 2): ("b",), (2, 0): ("a",), (2, 1): (), (2, 2): ("b",)}
    assert missing_experts(replicas, (1, 2), 3) == {2: [1]}  # no alive set: any replica counts
    assert missing_experts(replicas, (1, 2), 3, {"a"}) == {1: [2], 2: [1, 2]}
    assert missing_experts(replicas, (1, 2), 3, {"a", "b"}) == {2: [1]}
    assert missing_experts(replicas, (1, 2), 4, {"a", "b"}) == {1: [3], 2: [1, 3]}  # unplaced ids are missing
    assert missing_experts(replicas, (1, 2), 3, set()) == {1: [0, 1, 2], 2: [0, 1, 2]}


def test_placement_missing_takes_the_alive_node_indices():
    p = Placement.from_hosted([("h:0", {1: [0, 1]}), ("h:1", {1: [1, 2, 3]})])
    assert p.missing((1,), 4) == {}
    assert p.missing((1,), 4, alive={0}) == {1: [2, 3]}
    assert p.missing((1,), 4, alive={1}) == {1: [0]}


def test_describe_missing_groups_layers_and_cuts_long_lists():
    assert describe_missing({1: [4, 5, 6, 7], 2: [4, 5, 6, 7], 3: [0]}) == "layers 1-2: experts 4-7; layer 3: experts 0"
    assert describe_missing({1: [1, 3], 5: [1, 3]}) == "layers 1,5: experts 1,3"
    assert describe_missing({layer: [layer] for layer in range(6)}) == (
        "layer 0: experts 0; layer 1: experts 1; layer 2: experts 2; layer 3: experts 3; 2 more layers")
    assert describe_missing({1: list(range(0, 40, 2))}) == "layer 1: experts 0,2,4,6,8,10,12,14 and 12 more"
    assert describe_missing({1: [0, 1, 2, 4, 6, 8, 10, 12, 14, 15, 16, 20]}) == (
        "layer 1: experts 0-2,4,6,8,10,12,14-16,20")  # 8 ranges: all named
    assert describe_missing({1: [0, 1, 2, 4, 6, 8, 10, 12, 14, 15, 16, 20, 22, 23]}) == (
        "layer 1: experts 0-2,4,6,8,10,12,14-16,20 and 2 more")


# ---- judge: the rule ----------------------------------------------------------------------------------------
def test_nothing_missing_serves():
    assert judge({}, 2, 4, 8) == Servability("serving", MappingProxyType({}), 2, 8, 8)
    assert judge({}, 2, 4, 8).message == "" and judge({}, 2, 4, 8).error() is None


def test_missing_experts_with_room_for_all_of_them_is_degraded():
    verdict = judge({1: [4, 5, 6, 7], 2: [4, 5, 6, 7]}, 1, 8, 8)
    assert verdict.state == "degraded" and verdict.slots == 8 and verdict.error() is None
    assert verdict.message == ("no live expert node hosts layers 1-2: experts 4-7; re-planning them onto the 1 "
                               "live expert node(s)")
    assert judge({1: [0]}, 2, None, 8).state == "degraded"  # no published slots: a node can host every expert


def test_missing_experts_without_room_is_unservable_and_says_what_to_do():
    verdict = judge({1: [4, 5, 6, 7], 2: [4, 5, 6, 7]}, 1, 4, 8)
    assert verdict.state == "unservable" and dict(verdict.missing) == {1: (4, 5, 6, 7), 2: (4, 5, 6, 7)}
    assert verdict.message == (
        "the mesh cannot serve: no live expert node hosts layers 1-2: experts 4-7, and the 1 live expert node(s) "
        "have 4 slot(s) per MoE layer for 8 experts: add an expert node or raise --expert-slots; the mesh "
        "resumes by itself when a node returns")
    assert verdict.message.endswith(FIX)
    error = verdict.error()
    assert isinstance(error, UnservableError) and str(error) == verdict.message
    assert judge({1: [0]}, 0, 4, 8).state == "unservable"  # no live node at all
    assert judge({1: [0]}, 3, 2, 8).state == "unservable"  # 6 slots for 8 experts


# ---- over records ---------------------------------------------------------------------------------------------
def test_min_slots_and_live_nodes():
    records = [_expert("expert-0", 4), _expert("expert-1", 6), _expert("expert-2", None, "draining"),
               _expert("expert-3", 2, "failed")]
    assert min_slots(records) == 2 and min_slots(records[:2]) == 4 and min_slots([_expert("e-9", None)]) is None
    assert [r.id for r in live_expert_nodes(records)] == ["expert-0", "expert-1"]
    assert [r.id for r in live_expert_nodes(records, {"expert-0"})] == ["expert-1"]


def test_placement_servability_over_records():
    both = [_expert("expert-0"), _expert("expert-1")]
    assert placement_servability(None, both) is None  # no placement yet: the mesh is starting
    assert placement_servability(_halves(), both).state == "serving"
    killed = placement_servability(_halves(), both, down={"expert-1"})  # the health watch saw it die
    assert killed.state == "unservable" and dict(killed.missing) == {1: (4, 5, 6, 7), 2: (4, 5, 6, 7)}
    assert placement_servability(_halves(), both[:1]).state == "unservable"  # its record expired
    joined = [*both, _expert("expert-2")]
    assert placement_servability(_halves(), joined, down={"expert-1"}).state == "degraded"  # 2 x 4 slots: re-plan
    draining = [_expert("expert-0", 8), _expert("expert-1", 8, "draining")]
    assert placement_servability(_halves(), draining).state == "degraded"


# ---- the status: UNAVAILABLE, told not to retry ----------------------------------------------------------------
class _Context:
    def __init__(self):
        self.aborted = None

    def abort(self, code, details, trailing_metadata=None):
        self.aborted = (code, details, trailing_metadata)


def test_unservable_aborts_unavailable_with_no_retry_pushback():
    assert status_for(UnservableError("x")) == grpc.StatusCode.UNAVAILABLE
    ctx = _Context()
    abort(ctx, UnservableError("gone"))
    assert ctx.aborted == (grpc.StatusCode.UNAVAILABLE, "gone", NO_RETRY)
    assert NO_RETRY == (("grpc-retry-pushback-ms", "-1"),)
    assert no_retry(NO_RETRY) and not no_retry(()) and not no_retry(None)
    assert not no_retry((("grpc-retry-pushback-ms", "250"),))


@pytest.mark.parametrize("state", ["serving", "degraded"])
def test_only_unservable_is_an_error(state):
    assert Servability(state).error() is None
