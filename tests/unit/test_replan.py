"""decide_replan: when the leader re-plans (pure; exact decisions)."""

from __future__ import annotations

from moemesh.router.replan import Decision, Look, Timers, decide_replan

POLICY = dict(settle_s=1.0, rebalance_interval_s=30.0, min_balance=0.97, campaign_interval_s=2.0)
T = Timers(next_rebalance=130.0)


def look(has_placement=True, problem=None, joined=(), joined_at=0.0, behind=()) -> Look:
    return Look(has_placement, problem, tuple(joined), joined_at, tuple(behind))


def test_first_placement_waits_for_nodes_starting_together():
    first = look(False, "there is no placement yet", joined=("e0", "e1"), joined_at=99.5)
    assert decide_replan(first, T, 100.0, **POLICY) == Decision("settle", 0.5, timers=T)
    assert decide_replan(first, T, 100.5, **POLICY) == Decision(
        "plan", reason="there is no placement yet", min_balance=0.97, publish_always=True, timers=T)


def test_a_placement_that_cannot_serve_is_replanned_at_once():
    gone = look(problem="it names expert nodes that are gone, draining or unreachable: e1", joined_at=99.9)
    assert decide_replan(gone, T, 100.0, **POLICY) == Decision(
        "plan", reason="it names expert nodes that are gone, draining or unreachable: e1", min_balance=0.97,
        publish_always=True, timers=T)
    malformed = look(problem="the placement is malformed: placement layer 'x' is not an integer", joined_at=99.9)
    assert decide_replan(malformed, T, 100.0, **POLICY).kind == "plan"  # a stored placement exists: no settling


def test_joined_nodes_settle_then_take_load():
    joined = look(joined=("e2", "e3"), joined_at=99.75, behind=("a0",))
    assert decide_replan(joined, T, 100.0, **POLICY) == Decision("settle", 0.75, timers=T)
    assert decide_replan(joined, T, 101.0, **POLICY) == Decision(
        "plan", reason="expert nodes joined: e2, e3", min_balance=0.97, publish_always=True, timers=T)


def test_periodic_rebalance_defers_while_attention_nodes_switch():
    lagging = look(behind=("a0", "a1"))
    assert decide_replan(lagging, T, 130.0, **POLICY) == Decision(
        "defer", 2.0, timers=Timers(130.0, ("a0", "a1")))
    assert decide_replan(lagging, T, 130.0, **{**POLICY, "rebalance_interval_s": 1.5}) == Decision(
        "defer", 1.5, timers=Timers(130.0, ("a0", "a1")))
    caught_up = decide_replan(look(), Timers(130.0, ("a0", "a1")), 131.0, **POLICY)
    assert caught_up == Decision("plan", reason="periodic rebalance", min_balance=0.97, publish_always=False,
                                 timers=Timers(161.0))


def test_otherwise_wait_for_the_next_round_or_rebalance():
    assert decide_replan(look(), T, 100.0, **POLICY) == Decision("idle", 2.0, timers=T)
    assert decide_replan(look(), T, 129.5, **POLICY) == Decision("idle", 0.5, timers=T)
    assert decide_replan(look(), Timers(130.0, ("a0",)), 129.99, **POLICY) == Decision(
        "idle", 0.05, timers=Timers(130.0, ("a0",)))
    never = {**POLICY, "rebalance_interval_s": 0.0}
    assert decide_replan(look(behind=("a0",)), Timers(0.0), 500.0, **never) == Decision("idle", 2.0,
                                                                                        timers=Timers(0.0))
