"""Minimal-move re-plans on Zipf loads drifted by lognormal noise (sigma 0.3): replicas moved vs a fresh plan.

    .venv/bin/python scripts/replan-figures.py [TIME_LIMIT_S per layer, default 2]
"""

import random
import sys
import time

from moemesh.router.planner import _evaluate, _moved, _relabel, plan_placement


def zipf(n_experts, seed):
    ranks = list(range(n_experts))
    random.Random(seed).shuffle(ranks)
    return [1000.0 / (ranks[e] + 1) for e in range(n_experts)]


limit = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
for experts, nodes, slots, layers, seed in [(64, 8, 9, 4, 12), (256, 32, 10, 2, 12), (64, 8, 10, 4, 7),
                                            (256, 16, 34, 4, 3), (256, 64, 5, 2, 12)]:
    loads = [zipf(experts, s) for s in range(layers)]
    first = plan_placement(loads, nodes, slots)
    prev = [[[r.node for r in reps] for reps in layer.replicas] for layer in first.layers]
    rng = random.Random(seed)
    drifted = [[v * rng.lognormvariate(0, 0.3) for v in layer] for layer in loads]
    kept = min(_evaluate(d, tuple(map(tuple, p)), nodes)[2] for d, p in zip(drifted, prev))
    start = time.perf_counter()
    replan = plan_placement(drifted, nodes, slots, prev, time_limit_s=limit)
    took = time.perf_counter() - start
    fresh = plan_placement(drifted, nodes, slots)
    relabelled = sum(_moved(_relabel(tuple(tuple(r.node for r in reps) for reps in f.replicas), tuple(map(tuple, p)),
                                     nodes), tuple(map(tuple, p))) for f, p in zip(fresh.layers, prev))
    print(f"E={experts} N={nodes} S={slots} layers={layers}: shares only {kept:.3f}; re-plan moved {replan.moved} "
          f"of a fresh plan's {fresh.moved} ({100 * replan.moved / fresh.moved:.1f}%; fresh relabelled onto the "
          f"previous: {relabelled}), balance {min(l.balancedness for l in replan.layers):.4f} "
          f"(fresh {min(l.balancedness for l in fresh.layers):.4f}), {took:.1f} s")
