"""Typed watch events (moemesh.control.events) and the one ClusterView they feed (pure, no etcd)."""

from __future__ import annotations

import structlog

from moemesh.control.cluster_view import ClusterView
from moemesh.control.events import ClusterEvents, LeaderChanged, NodeChanged, NodeDown, NodeUp, PlacementChanged
from moemesh.control.keys import Keys
from moemesh.control.placement import Placement
from moemesh.control.records import NodeRecord, PlacementRecord

K = Keys("c")
PLACEMENT = {"version": 2, "layers": {"1": {"0": ["e0", "e1"], "1": ["e1"]}}, "shares": {"1": {"0": [0.75, 0.25],
                                                                                                 "1": [1.0]}}}


def expert(node_id: str, **fields) -> dict:
    return {"id": node_id, "role": "expert", "address": f"{node_id}:1", "status": "ready", **fields}


def test_events_are_typed_and_tell_up_from_changed():
    events = ClusterEvents(K)
    e0 = expert("e0", experts={"1": [0]})
    assert events.decode("put", K.node("expert", "e0"), e0) == NodeUp(NodeRecord.from_json(e0))
    again = {**e0, "status": "draining"}
    assert events.decode("put", K.node("expert", "e0"), again) == NodeChanged(NodeRecord.from_json(again))
    assert events.decode("delete", K.node("expert", "e0"), None) == NodeDown("expert", "e0")
    assert events.decode("put", K.node("expert", "e0"), e0) == NodeUp(NodeRecord.from_json(e0))  # back again
    assert events.decode("put", K.placement(), PLACEMENT) == PlacementChanged(PlacementRecord.from_json(PLACEMENT))
    assert events.decode("delete", K.placement(), None) == PlacementChanged(None)
    assert events.decode("put", K.leader(), "router-a") == LeaderChanged("router-a")
    assert events.decode("delete", K.leader(), None) == LeaderChanged(None)
    assert events.decode("put", f"{K.root}something-else", {"x": 1}) is None
    assert events.decode("put", "/moemesh/other/leader", "router-b") is None


def test_the_key_names_the_node():
    ev = ClusterEvents(K).decode("put", K.node("attn", "a1"), {"id": "liar", "role": "expert", "address": "h:1",
                                                                "status": "ready"})
    assert (ev.record.id, ev.record.role) == ("a1", "attn")


def test_bad_values_are_skipped_and_logged_once_per_key():
    events = ClusterEvents(K)
    key = K.node("expert", "e0")
    with structlog.testing.capture_logs() as logs:
        assert events.decode("put", key, "not json{") is None
        assert events.decode("put", key, expert("e0", status="up")) is None  # still bad: not logged again
        assert events.decode("put", K.placement(), {"version": "two", "layers": {}}) is None
        assert events.decode("put", K.leader(), {"id": 3}) is None
        assert isinstance(events.decode("put", key, expert("e0")), NodeUp)  # good again
        assert events.decode("put", key, expert("e0", experts={"x": [1]})) is None  # bad again: logged again
    skipped = [(e["key"], e["error"]) for e in logs if e["event"] == "etcd_record_skipped"]
    assert skipped == [
        (key, "node record must be a dict, got str"),
        (K.placement(), "placement version must be an int >= 0, got 'two'"),
        (K.leader(), "the leader's id is not a JSON string"),
        (key, "node experts layer 'x' is not an integer"),
    ]


def feed(view: ClusterView, *values) -> list[bool]:
    events = ClusterEvents(K)
    changes = []
    for kind, key, value in values:
        ev = events.decode(kind, key, value)
        changes.append(ev is not None and view.apply(ev))
    return changes


def test_view_applies_events_and_says_what_changed():
    view = ClusterView()
    changed = feed(view, ("put", K.node("expert", "e0"), expert("e0")), ("put", K.node("expert", "e0"), expert("e0")),
                   ("put", K.node("attn", "a0"), {"id": "a0", "role": "attn", "address": "a:1", "status": "ready"}),
                   ("put", K.node("expert", "e0"), "garbage"),  # skipped: the view keeps e0's record
                   ("put", K.leader(), "r0"), ("put", K.leader(), "r0"), ("put", K.placement(), PLACEMENT),
                   ("delete", K.node("expert", "gone"), None))
    assert changed == [True, False, True, False, True, False, True, False]
    assert [r.id for r in view.records()] == ["a0", "e0"]
    assert [r.id for r in view.records("expert")] == ["e0"]
    assert [r.id for r in view.ready_attention_nodes()] == ["a0"]
    assert (view.leader, view.placement_version, view.node("expert", "e0").status) == ("r0", 2, "ready")
    assert view.assignment("e1") == {1: (0, 1)} and view.assignment("zz") == {}
    assert (view.in_placement("e0"), view.in_placement("a0")) == (True, False)
    assert feed(view, ("delete", K.placement(), None)) == [True]
    assert (view.placement, view.placement_version, view.assignment("e1")) == (None, 0, {})


def test_attention_behind():
    view = ClusterView()
    feed(view, *[("put", K.node("attn", i), {"id": i, "role": "attn", "address": "h:1", **f}) for i, f in [
        ("a", {"status": "ready", "placement_version": 1}), ("b", {"status": "draining", "placement_version": 1}),
        ("c", {"status": "loading", "placement_version": 0}), ("d", {"status": "ready"}),
        ("e", {"status": "ready", "placement_version": 2})]])
    assert view.attention_behind(2) == ["a", "b"]
    assert view.attention_behind(1) == []


def test_serving_placement_waits_for_every_node_to_hold_its_share():
    view = ClusterView()
    feed(view, ("put", K.placement(), PLACEMENT),
         ("put", K.node("expert", "e0"), expert("e0", experts={"1": [0]}, placement_version=2)),
         ("put", K.node("expert", "e1"), expert("e1", status="loading", experts={"1": [0, 1]}, placement_version=2)))
    assert view.serving_placement() is None  # e1 is still loading
    feed(view, ("put", K.node("expert", "e1"), expert("e1", experts={"1": [0]}, placement_version=2)))
    assert view.serving_placement() is None  # e1 lacks expert 1
    feed(view, ("put", K.node("expert", "e1"), expert("e1", experts={"1": [0, 1]}, placement_version=1)))
    assert view.serving_placement() is None  # e1 has not finished applying version 2
    feed(view, ("put", K.node("expert", "e1"), expert("e1", experts={"1": [1, 0]}, placement_version=2)))
    assert view.serving_placement() == Placement(("e0:1", "e1:1"), {(1, 0): (0, 1), (1, 1): (1,)}, 2,
                                                 {(1, 0): (0.75, 0.25), (1, 1): (1.0,)})
    feed(view, ("delete", K.node("expert", "e0"), None))
    assert view.serving_placement() is None
