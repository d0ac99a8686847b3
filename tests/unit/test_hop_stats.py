"""attn_node/experts/hop_stats.py and router/hop_status.py: per expert node hop summaries, exact outputs."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from tests.helpers import eventually

from moemesh.attn_node.experts.hop_stats import HopRecorder, HopSummary, HopWindow, flush_all, percentile
from moemesh.router.hop_status import NodeHops, fill_hops, merge_hops, stragglers
from moemesh.v1 import attention_pb2, inference_pb2


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile(values, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([], 50) == 0.0
    assert percentile([7.0], 99) == 7.0


def test_window_summarizes_per_node_and_forgets_old_hops():
    clock = Clock()
    window = HopWindow(window_s=10.0, clock=clock)
    for i in range(1, 11):
        window.record("b:2", i * 1e-4, 1e-5)  # 100..1000 us
    window.record("a:1", 5e-4, 2e-4)
    assert window.summaries() == [HopSummary("a:1", 1, 500.0, 500.0, 200.0),
                                  HopSummary("b:2", 10, 500.0, 1000.0, 10.0)]
    clock.now += 5.0
    window.record("b:2", 0.05, 1e-5)
    clock.now += 6.0  # the first hops are 11 s old now: only the last one of b:2 is in the window
    (only,) = window.summaries()
    assert (only.address, only.samples, only.hop_p50_us) == ("b:2", 1, 50_000.0)


def test_window_keeps_at_most_max_samples():
    window = HopWindow(max_samples=3, clock=Clock())
    for hop in (1.0, 2.0, 3.0, 4.0):
        window.record("n", hop * 1e-6, 0.0)
    (s,) = window.summaries()
    assert s.samples == 3 and s.hop_p50_us == pytest.approx(3.0)


def test_recorder_observes_every_split_and_never_a_negative_transport():
    rec = HopRecorder("rec-node:1", HopWindow(clock=Clock()))
    before = _count("moemesh_dispatch_transport_seconds", "rec-node:1")
    rec.record(0.001, receive_ns=100_000, compute_ns=500_000, send_ns=100_000)
    rec.record(0.001, receive_ns=0, compute_ns=2_000_000, send_ns=0)  # a node clock running fast
    rec.flush()
    assert _count("moemesh_dispatch_transport_seconds", "rec-node:1") == before + 2
    assert _sum("moemesh_dispatch_transport_seconds", "rec-node:1") == pytest.approx(0.0003)
    assert _sum("moemesh_dispatch_compute_seconds", "rec-node:1") == pytest.approx(0.0025)
    assert _count("moemesh_dispatch_hop_seconds", "rec-node:1") == 2
    (s,) = rec.window.summaries()
    assert (s.samples, s.hop_p50_us, s.compute_p50_us) == (2, pytest.approx(1000.0), pytest.approx(500.0))


def test_recorder_publishes_from_the_flusher_and_when_the_window_is_summarized():
    window = HopWindow(clock=Clock())
    rec = HopRecorder("batch-node:1", window)
    for _ in range(40):
        rec.record(0.001, 0, 0, 0)
    assert window.totals() == (pytest.approx(0.04), 0.0, 40)  # the window (and auto's totals) at once
    eventually(lambda: _count("moemesh_dispatch_hop_seconds", "batch-node:1") == 40)  # the flusher thread's
    rec.record(0.002, 0, 0, 0)
    (s,) = window.summaries()  # summarizing publishes what was held
    assert s.samples == 41
    assert _count("moemesh_dispatch_hop_seconds", "batch-node:1") == 41


def test_one_recorder_failing_to_publish_stops_no_other():
    window = HopWindow(clock=Clock())
    broken, fine = HopRecorder("broken-node:1", window), HopRecorder("fine-node:1", window)

    def fail():
        raise RuntimeError("a histogram refused the sample")

    broken.flush = fail
    broken.record(0.001, 0, 0, 0)
    fine.record(0.001, 0, 0, 0)
    flush_all()  # the flusher thread's round: it logs the failure and goes on (the thread lives on)
    assert _count("moemesh_dispatch_hop_seconds", "fine-node:1") == 1


def _sample(name: str, suffix: str, node: str) -> float:
    return REGISTRY.get_sample_value(name + suffix, {"node": node}) or 0.0


def _count(name, node):
    return _sample(name, "_count", node)


def _sum(name, node):
    return _sample(name, "_sum", node)


def _hops(address, samples, p50, p99, compute):
    return attention_pb2.ExpertHops(address=address, samples=samples, hop_p50_us=p50, hop_p99_us=p99,
                                    compute_p50_us=compute)


def test_merge_weights_medians_by_samples_and_keeps_the_worst_p99():
    merged = merge_hops([
        [_hops("e1:1", 30, 100.0, 400.0, 10.0), _hops("e2:2", 0, 1.0, 1.0, 1.0)],
        [_hops("e1:1", 10, 200.0, 900.0, 50.0)],
        [],
    ])
    assert merged == {"e1:1": NodeHops(40, 125.0, 900.0, 20.0)}  # e2 had no samples: nothing to say


def test_fill_hops_writes_expert_nodes_only_and_survives_a_silent_attention_node():
    class Pool:  # AttentionPool.expert_hops: a silent node's Load failed, so it reports ()
        hops = {"a1": (_hops("10.0.0.2:5", 4, 300.0, 700.0, 40.0),), "a2": ()}

        async def expert_hops(self, records):
            return [self.hops[r] for r in records]

    nodes = [inference_pb2.NodeStatus(id="e", role="expert", address="10.0.0.2:5"),
             inference_pb2.NodeStatus(id="a", role="attn", address="10.0.0.2:5"),
             inference_pb2.NodeStatus(id="f", role="expert", address="10.0.0.3:5")]
    asyncio.run(fill_hops(Pool(), ["a1", "a2"], nodes))
    assert (nodes[0].hop_samples, nodes[0].hop_p50_us, nodes[0].hop_p99_us, nodes[0].compute_p50_us) == (
        4, 300.0, 700.0, 40.0)
    assert nodes[1].hop_samples == 0 and nodes[2].hop_samples == 0


def test_stragglers_are_well_above_their_peers_median_p99_with_enough_hops():
    def hops(p99, samples=100):
        return NodeHops(samples, p99 / 2, p99, 10.0)

    assert stragglers({"a": hops(100), "b": hops(120), "c": hops(360)}) == {"c"}  # 360 >= 3 x 110
    assert stragglers({"a": hops(100), "b": hops(120), "c": hops(320)}) == set()  # under 3x: noise
    assert stragglers({"a": hops(100), "c": hops(900, samples=10)}) == set()  # too few hops to tell
    assert stragglers({"c": hops(900)}) == set()  # no peer to compare with
    assert stragglers({"a": hops(100), "b": hops(300)}, ratio=3.0) == {"b"}
