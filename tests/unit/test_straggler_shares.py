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
