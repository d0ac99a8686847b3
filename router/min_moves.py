"""Minimal-move re-placement (pure): the fewest new replicas that bring one layer to a balance target.

Vocabulary as in ``router/planner.py``. Given the previous holders P[e] of each expert (nodes that already have
its weights) and the new loads w[e], find new holders H[e] that

* respect the slots (at most S replicas per node), put each expert on distinct nodes, give every expert at least
  ``floor`` replicas and, with failure domains, a replica outside every zone (``zone_of``: ``router/zones.py``);
* admit shares whose most loaded node carries at most T = (sum w / N) / target, i.e. balancedness >= target;
* move the fewest replicas: sum over e of |H[e] - P[e]| (dropping a replica is free; loading weights is not).

This is solved exactly as a mixed-integer program (``scipy.optimize.milp``, HiGHS): x[e,n] in {0, 1} says node n
holds expert e, f[e,n] >= 0 the tokens of e it takes, with

    f[e,n] <= min(w[e], T) x[e,n]     sum_n f[e,n] = w[e]       sum_e f[e,n] <= T
    sum_e x[e,n] <= S                 sum_n x[e,n] >= floor     sum_{n not in zone z} x[e,n] >= 1 (every zone z)

minimising sum_{n not in P[e]} x[e,n] (ties: keeping the most previous replicas). Shares meeting the flows
exist exactly when this bipartite transportation problem is feasible, so "a plan meets the target" and "the program is feasible" are the same statement (over the
candidate pairs). When HiGHS stops at ``time_limit_s`` it returns its best plan so far: the fewest moves it found,
not proven fewest (never a plan missing the target).

Candidate pairs: every (expert, node) when E x N <= ``MAX_EXACT_PAIRS``; beyond that, the previous pairs plus new
pairs for the experts with the most load per previous replica (those the flows cannot spread) and for those
the constraints force to move (no replica left, below the floor or the zone rule), so the program stays small
(milliseconds to a few seconds with HiGHS). The result is then the fewest moves among plans that add replicas only
of those experts. When it finds none in ``time_limit_s`` the caller falls back to greedy moves
(``router/greedy_moves.py``), then to a fresh plan.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from .zones import spans_zones

Holders = tuple[tuple[int, ...], ...]

TOLERANCE = 1e-9  # relative margin under the cap, so the water-filled shares land on the right side of it
MAX_EXACT_PAIRS = 4096  # every (expert, node) pair is a candidate up to this many
CANDIDATE_EXPERTS = 16  # beyond it: new replicas only for this many of the least spreadable experts
DEFAULT_TIME_LIMIT_S = 2.0  # per layer; HiGHS returns its best plan so far (or none) when it runs out


def _candidates(loads: Sequence[float], previous: Holders, n_nodes: int, floor: int,
                zone_of: Sequence[int] | None) -> list[tuple[int, int]]:
    n_experts = len(loads)
    forced = {e for e, nodes in enumerate(previous) if len(nodes) < floor or not spans_zones(nodes, zone_of)}
    if n_experts * n_nodes <= MAX_EXACT_PAIRS:
        movable = set(range(n_experts))
    else:
        by_spread = sorted(range(n_experts), key=lambda e: (-loads[e] / max(1, len(previous[e])), e))
        movable = set(by_spread[:CANDIDATE_EXPERTS]) | forced
    pairs = [(e, n) for e in range(n_experts) for n in previous[e]]
    pairs += [(e, n) for e in sorted(movable) for n in range(n_nodes) if n not in previous[e]]
    return pairs


def min_move_holders(loads: Sequence[float], previous: Holders, n_nodes: int, slots_per_node: int, floor: int,
                     target: float, zone_of: Sequence[int] | None = None,
                     time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> Holders | None:
    """Holders with the fewest moves from ``previous`` meeting balancedness ``target`` (module docstring), with
    every expert's replicas in >= 2 zones when ``zone_of`` (zone per node; ``router/zones.py``) is given;
    None when no plan over the candidate pairs meets it (or none was found in ``time_limit_s``)."""
    n_experts = len(loads)
    total = float(sum(loads))
    cap = total / n_nodes / target * (1 - TOLERANCE)
    pairs = _candidates(loads, previous, n_nodes, floor, zone_of)
    n_pairs = len(pairs)
    n_cols = 2 * n_pairs  # x: 0..P-1, f: P..2P-1
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    lower: list[float] = []
    upper: list[float] = []

    def row(entries, lo: float, hi: float) -> None:
        r = len(lower)
        for c, v in entries:
            rows.append(r)
            cols.append(c)
            vals.append(v)
        lower.append(lo)
        upper.append(hi)

    by_expert: list[list[int]] = [[] for _ in range(n_experts)]
    by_node: list[list[int]] = [[] for _ in range(n_nodes)]
    for i, (e, n) in enumerate(pairs):
        by_expert[e].append(i)
        by_node[n].append(i)
        row([(n_pairs + i, 1.0), (i, -min(loads[e], cap))], -np.inf, 0.0)
    for e in range(n_experts):
        row([(n_pairs + i, 1.0) for i in by_expert[e]], loads[e], loads[e])
        row([(i, 1.0) for i in by_expert[e]], floor, np.inf)
        if zone_of is not None:
            for z in sorted(set(zone_of)):
                row([(i, 1.0) for i in by_expert[e] if zone_of[pairs[i][1]] != z], 1.0, np.inf)
    for n in range(n_nodes):
        row([(n_pairs + i, 1.0) for i in by_node[n]], -np.inf, cap)
        row([(i, 1.0) for i in by_node[n]], -np.inf, slots_per_node)
    # a move costs 1; keeping a previous replica earns 1 / (previous replicas + 1), less than one move in all:
    # among the plans with the fewest moves, the one dropping the fewest replicas that are already loaded
    n_previous = sum(len(nodes) for nodes in previous)
    cost = np.zeros(n_cols)
    for i, (e, n) in enumerate(pairs):
        cost[i] = -1.0 / (n_previous + 1) if n in previous[e] else 1.0
    integrality = np.zeros(n_cols)
    integrality[:n_pairs] = 1
    upper_bounds = np.concatenate([np.ones(n_pairs), [loads[e] for e, _ in pairs]])
    matrix = coo_matrix((vals, (rows, cols)), shape=(len(lower), n_cols)).tocsr()
    res = milp(cost, constraints=LinearConstraint(matrix, lower, upper), integrality=integrality,
               bounds=Bounds(np.zeros(n_cols), upper_bounds),
               options={"time_limit": time_limit_s, "disp": False})
    if res.x is None:
        return None
    held: list[list[int]] = [[] for _ in range(n_experts)]
    for i, (e, n) in enumerate(pairs):
        if res.x[i] > 0.5:
            held[e].append(n)
    return _keep_free_replicas(tuple(tuple(sorted(h)) for h in held), previous, slots_per_node)


def _keep_free_replicas(holders: Holders, previous: Holders, slots_per_node: int) -> Holders:
    """Put back previous replicas the program dropped where their node still has a free slot: they cost no
    move, and more holders never make the best shares worse."""
    used = {}
    for nodes in holders:
        for n in nodes:
            used[n] = used.get(n, 0) + 1
    out = [list(nodes) for nodes in holders]
    for e, prev in enumerate(previous):
        for n in prev:
            if n not in out[e] and used.get(n, 0) < slots_per_node:
                out[e].append(n)
                used[n] = used.get(n, 0) + 1
    return tuple(tuple(sorted(nodes)) for nodes in out)
