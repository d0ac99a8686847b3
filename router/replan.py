"""When the leader re-plans the placement: a pure decision over one look at the cluster.

Pure (no I/O; the clock is an argument). :class:`~.cluster.ControlPlane` gathers a :class:`Look` (the stored
placement, why it cannot serve, which expert nodes joined since it was planned, which attention nodes are
still switching to its version) and the timers it keeps (:class:`Timers`); :func:`decide_replan` says what
to do, in this order:

1. the placement cannot serve (a logical expert without a live replica, a replica on a gone node, a
   malformed placement): plan at once, except that before the *first* placement the leader waits
   ``settle_s`` after the last expert node appeared, so nodes starting together are planned over together;
2. expert nodes joined that the placement was not planned over: wait ``settle_s`` too, then plan (an empty
   newcomer lowers the balancedness, so the minimal-move plan moves load onto it until ``min_balance`` holds);
3. every ``rebalance_interval_s``: plan on the measured loads, published only if worthwhile
   (``Decision.publish_always`` False), but deferred while attention nodes still route by an older
   version (the last version is not in force yet: expert nodes still hold what it dropped);
4. otherwise nothing: look again at the next campaign round or rebalance time, whichever comes first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MIN_WAIT_S = 0.05  # never busy-loop: the shortest wait a decision asks for


@dataclass(frozen=True)
class Look:
    """What the leader sees at one look."""

    has_placement: bool  # etcd holds a placement (a malformed one too)
    problem: str | None  # why the placement cannot serve these nodes (placement_problem / read_placement)
    joined: tuple[str, ...]  # live expert nodes the placement was not planned over (sorted)
    joined_at: float  # when an expert node last appeared (monotonic seconds)
    behind: tuple[str, ...]  # attention nodes still routing by an older placement version (sorted)


@dataclass(frozen=True)
class Timers:
    """What the leader carries from one look to the next."""

    next_rebalance: float  # when the next periodic rebalance is due (monotonic seconds)
    deferred_for: tuple[str, ...] = ()  # the lagging attention nodes the last deferral waited for


@dataclass(frozen=True)
class Decision:
    kind: Literal["plan", "settle", "defer", "idle"]
    wait_s: float = 0.0  # settle, defer, idle: look again after this long
    reason: str = ""  # plan: why (goes into the placement's stats)
    min_balance: float = 0.0  # plan: the balancedness (mean / max node load) the plan must reach, moving least
    publish_always: bool = False  # plan: write it even if it changes nothing worth a new version
    timers: Timers | None = None  # the timers to carry on


def decide_replan(look: Look, timers: Timers, now: float, *, settle_s: float, rebalance_interval_s: float,
                  min_balance: float, campaign_interval_s: float) -> Decision:
    """What the leader does at ``now`` (module docstring), and the timers it keeps afterwards."""
    settle_left = look.joined_at + settle_s - now
    if look.problem is not None:
        if not look.has_placement and settle_left > 0:
            return Decision("settle", settle_left, timers=timers)
        return Decision("plan", reason=look.problem, min_balance=min_balance, publish_always=True, timers=timers)
    if look.joined:
        if settle_left > 0:
            return Decision("settle", settle_left, timers=timers)
        return Decision("plan", reason=f"expert nodes joined: {', '.join(look.joined)}", min_balance=min_balance,
                        publish_always=True, timers=timers)
    if rebalance_interval_s > 0 and now >= timers.next_rebalance:
        if look.behind:
            return Decision("defer", min(campaign_interval_s, rebalance_interval_s),
                            timers=Timers(timers.next_rebalance, look.behind))
        return Decision("plan", reason="periodic rebalance", min_balance=min_balance,
                        timers=Timers(now + rebalance_interval_s))
    wait = campaign_interval_s
    if rebalance_interval_s > 0:
        wait = min(wait, max(MIN_WAIT_S, timers.next_rebalance - now))
    return Decision("idle", wait, timers=timers)
