"""router/straggler_shares.py: a straggler's share of each replicated expert is halved, exact outputs."""

from __future__ import annotations

import pytest

from moemesh.control.records import PlacementRecord, PlacementStats
from moemesh.router.straggler_shares import lower_straggler_shares


def _placement(shares=None):
    layers = {1: {0: ("a", "b"), 1: ("b",), 2: ("b", "c")}, 2: {0: ("a", "c")}}
    return PlacementRecord(7, layers, shares, PlacementStats(reason="periodic rebalance"))


def test_a_stragglers_share_is_halved_where_a_faster_replica_exists():
    p = lower_straggler_shares(_placement(), {"b"})
    assert p.share_of(1, 0) == pytest.approx((2 / 3, 1 / 3))  # 0.5 : 0.25, renormalized
    assert p.share_of(1, 1) == (1.0,)  # only b holds it: nowhere faster to go
    assert p.share_of(1, 2) == pytest.approx((1 / 3, 2 / 3))
    assert p.share_of(2, 0) == (0.5, 0.5)  # b holds none of it
    assert p.stats.reason == "periodic rebalance; stragglers given less: b"
    assert p.layers == _placement().layers and p.version == 7


def test_planned_shares_are_the_starting_point():
    p = lower_straggler_shares(_placement({1: {0: (0.2, 0.8), 1: (1.0,), 2: (0.5, 0.5)}, 2: {0: (0.5, 0.5)}}),
                               {"b"}, factor=0.25)
    assert p.share_of(1, 0) == pytest.approx((0.2 / 0.4, 0.2 / 0.4))


def test_no_straggler_or_only_stragglers_change_nothing():
    base = _placement()
    assert lower_straggler_shares(base, set()) is base
    everyone = lower_straggler_shares(base, {"a", "b", "c"})
    assert everyone is base  # every replica is slow: the shares stay as planned


def test_applied_loads_follow_the_lowered_shares():
    # tokens per expert: layer 1: e0 60, e1 30, e2 90; layer 2: e0 40. Equal shares planned:
    # a: 30 | 20, b: 30 + 30 + 45 = 105 | 0, c: 45 | 20
    planned = {"a": (30.0, 20.0), "b": (105.0, 0.0), "c": (45.0, 20.0)}
    base = PlacementRecord(7, _placement().layers, None, PlacementStats(reason="r", node_loads=planned))
    p = lower_straggler_shares(base, {"b"}, loads={1: [60, 30, 90], 2: [40]})
    # b keeps 1/3 of e0 (20) and of e2 (30), all of e1 (30): 80; a takes 40 of e0, c 60 of e2
    assert dict(p.stats.applied_loads) == {"a": (40.0, 20.0), "b": (80.0, 0.0), "c": (60.0, 20.0)}
    assert p.stats.applied_fractions() == pytest.approx({"a": 60 / 220, "b": 80 / 220, "c": 80 / 220})
    assert p.stats.planned_fractions() == pytest.approx({"a": 50 / 220, "b": 105 / 220, "c": 65 / 220})
    # through JSON, as the leader writes it and the routers read it
    assert PlacementRecord.from_json(p.to_json()).stats.applied_fractions() == p.stats.applied_fractions()


def test_without_loads_the_stats_say_nothing_applied():
    p = lower_straggler_shares(_placement(), {"b"})
    assert p.stats.applied_fractions() == {}
