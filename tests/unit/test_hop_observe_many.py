"""hop_stats.observe_many: a batch of values lands in a histogram exactly as one observe() per value would."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from moemesh.attn_node.experts.hop_stats import observe_many

BOUNDS = (1e-5, 5e-5, 1e-4, 1e-3)


def _samples(registry: CollectorRegistry) -> list[tuple]:
    return [(s.name, tuple(sorted(s.labels.items())), s.value) for m in registry.collect() for s in m.samples
            if not s.name.endswith("_created")]


def _pair():
    one, many = CollectorRegistry(), CollectorRegistry()
    return (one, Histogram("h_seconds", "h", ["node"], buckets=BOUNDS, registry=one).labels("n"),
            many, Histogram("h_seconds", "h", ["node"], buckets=BOUNDS, registry=many).labels("n"))


def test_a_batch_lands_as_one_observe_per_value():
    one, a, many, b = _pair()
    values = np.array([0.0, 1e-5, 1.0000001e-5, 3e-5, 5e-5, 7e-4, 1e-3, 2.0, 1e-6, 9e-5])  # on and off the bounds
    for v in values.tolist():
        a.observe(v)
    observe_many(b, values)
    observe_many(b, np.array([]))  # nothing: nothing changes
    assert _samples(many) == _samples(one)
    counts = {s[1]: s[2] for s in _samples(many) if s[0] == "h_seconds_bucket"}
    assert counts[(("le", "1e-05"), ("node", "n"))] == 3 and counts[(("le", "+Inf"), ("node", "n"))] == 10


def test_a_child_without_the_fields_gets_observe_per_value():
    seen = []

    class Plain:
        def observe(self, value):
            seen.append(value)

    observe_many(Plain(), np.array([1.0, 2.0]))
    assert seen == [1.0, 2.0]


def test_the_installed_client_takes_the_fast_path():
    """observe_many reads prometheus_client's private fields (``_upper_bounds``, ``_buckets``, ``_sum``) and falls
    back to one observe() per value, silently, when they are not there: pinned here, so an upgrade that renames
    them fails this test instead of slowing every hop's histograms down unnoticed."""
    _, _, many, child = _pair()

    def refused(value):
        raise AssertionError("observe() called: observe_many fell back to the slow path")

    child.observe = refused
    observe_many(child, np.array([1e-5, 2e-4, 3.0]))
    counts = {s[1]: s[2] for s in _samples(many) if s[0] == "h_seconds_bucket"}
    assert counts[(("le", "+Inf"), ("node", "n"))] == 3 and counts[(("le", "0.001"), ("node", "n"))] == 2
