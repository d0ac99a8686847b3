"""micro_batch_auto: what the engine measures for the policy, and the choice it makes from it."""

from __future__ import annotations

import time
from dataclasses import astuple, dataclass, replace

import pytest
import torch

from moemesh.attn_node.engine import Engine, EngineConfig
from moemesh.attn_node.experts.hop_stats import HopRecorder
from moemesh.attn_node.micro_batch_auto import (PROBE_EVERY, WARM_STEPS, AutoMicroBatches, FixedMicroBatches,
                                                LayerClock, LayerTimes, check_micro_batches, hop_totals,
                                                layer_times, micro_batching)
from moemesh.attn_node.micro_batch_policy import LayerCosts
from moemesh.expert_backend import StaticExpertBackend
from moemesh.sampling import SamplingParams

from .test_engine import prompts_of, tiny  # noqa: F401  (the session's tiny model)


def test_layer_times_from_marks():
    # (dispatch called, dispatch returned, combine called, combine returned), seconds
    marks = [(0.0, 0.1, 0.3, 1.3), (2.3, 2.4, 2.6, 3.1), (4.1, 4.3, 4.5, 5.5)]
    # busy: 2.6 - 1.3 = 1.3, 4.5 - 3.1 = 1.4; send: (0.1 + 0.1 + 0.2) / 3; wait: (1.0 + 0.5 + 1.0) / 3
    assert astuple(layer_times(marks)) == pytest.approx((1.35, 0.4 / 3, 2.5 / 3))
    assert astuple(layer_times(marks[:1])) == pytest.approx((0.3, 0.1, 1.0))  # one layer: from its dispatch
    assert layer_times([]) is None


def test_hop_totals_count_each_hop_at_once():
    """Hops count the moment a link records them, though the histograms are published in batches of 32."""
    recorder = HopRecorder("test-hop-totals:1")
    hop, compute, n = hop_totals()
    recorder.record(0.003, 0, 1_000_000, 0)
    assert hop_totals() == pytest.approx((hop + 0.003, compute + 0.001, n + 1))


@pytest.mark.parametrize("value", ["auto", 1, 3])
def test_micro_batches_values(value):
    assert check_micro_batches(value) == value
    assert isinstance(micro_batching(value), AutoMicroBatches if value == "auto" else FixedMicroBatches)


@pytest.mark.parametrize("bad", [0, -1, "2", "AUTO ", 1.5, True])
def test_bad_micro_batches_name_the_field(bad, tiny):  # noqa: F811
    with pytest.raises(ValueError, match="EngineConfig.micro_batches must be 'auto' or an integer >= 1"):
        Engine(tiny.model, tiny.cfg, EngineConfig(micro_batches=bad), backend=tiny.backend)


@dataclass
class _Item:
    num_tokens: int


class _Feed:
    """Scripted measurements: each whole step's hops (seconds per hop, hops) and the clock's marks."""

    def __init__(self, hop_s: float, compute_s: float, hops_per_step: int):
        self.hop_s, self.compute_s, self.hops_per_step = hop_s, compute_s, hops_per_step
        self.hop = self.compute = self.n = 0.0

    def totals(self):
        return self.hop, self.compute, self.n

    def run(self, auto: AutoMicroBatches, steps: int, items, marks, step_s: dict[int, float]) -> list[int]:
        """``steps`` steps of ``items``; returns the micro-batches each ran."""
        ran = []
        for _ in range(steps):
            auto.start_step()
            m = auto.pick(items)
            if m == 1:
                auto.clock.marks = list(marks)
            self.n += self.hops_per_step
            self.hop += self.hops_per_step * self.hop_s
            self.compute += self.hops_per_step * self.compute_s
            auto.observe(items, m, step_s[m])
            ran.append(m)
        return ran


# A 1 ms, S 0.1 ms, W 4 ms per layer over 2 MoE layers; hops of 2.3 ms with 0.2 ms of compute
MARKS = [(0.0, 0.0001, 0.0002, 0.0042), (0.0052, 0.0053, 0.0052, 0.0092)]


def _auto(feed: _Feed, probe_every: int = PROBE_EVERY) -> AutoMicroBatches:
    auto = AutoMicroBatches(probe_every=probe_every, hops=feed.totals)
    auto.wrap(StaticExpertBackend.__new__(_Nothing))
    return auto


class _Nothing(StaticExpertBackend):
    def dispatch(self, *a):
        raise AssertionError("not called")

    def combine(self, handle):
        raise AssertionError("not called")


def test_auto_measures_whole_then_splits_when_the_model_says_it_pays():
    feed = _Feed(hop_s=0.0023, compute_s=0.0002, hops_per_step=4)
    auto = _auto(feed)
    items = [_Item(1)] * 4  # four decoding sequences: bucket 3
    ran = feed.run(auto, WARM_STEPS + 3, items, MARKS, {1: 0.010, 2: 0.007, 3: 0.006, 4: 0.006})
    # A 1.0, W 4.0 (the first layer's busy time is not counted: it holds the dense layers), S 0.1, C 0.2,
    # F 2.1 (this bucket is the smallest seen): fixed = min(4, 2.3) = 2.3;
    # m=2: max(1.1, 0.5 + 2.3 + 0.85, 0.4) = 3.65 / 5; m=3: max(1.2, 0.333 + 2.3 + 0.567, 0.6) = 3.2 / 5;
    # m=4: max(1.3, 0.25 + 2.3 + 0.425, 0.8) = 2.975 / 5 -> 4
    costs = auto.costs(auto._buckets[3])
    assert astuple(costs) == pytest.approx(astuple(LayerCosts(0.001, 0.004, 0.0001, 0.0002, 0.0021)))
    # step 4 is a probe (right after warm-up every other step is): whole
    assert ran == [1, 1, 4, 1, 4] and auto.current == 4 and auto.remote is True


def test_auto_goes_back_to_whole_steps_when_the_probe_measures_them_faster():
    feed = _Feed(hop_s=0.0023, compute_s=0.0002, hops_per_step=4)
    auto = _auto(feed)  # probes every 32 steps after the exploration
    items = [_Item(1)] * 4
    # step 3 splits on the model's word and measures it slower (contention the model cannot see): from step 4 on
    # the bucket runs whole; the even steps are probes (exploring after warm-up), and probe the split
    ran = feed.run(auto, 13, items, MARKS, {1: 0.010, 4: 0.012})
    assert ran == [1, 1, 4, 4, 1, 4, 1, 4, 1, 4, 1, 1, 1]
    assert auto.current == 1 and auto.steps_by_m == {1: 8, 4: 5}


def test_a_decided_bucket_stops_exploring_and_probes_ever_less_often():
    feed = _Feed(hop_s=0.0023, compute_s=0.0002, hops_per_step=4)
    auto = _auto(feed, probe_every=4)
    items = [_Item(1)] * 4
    ran = feed.run(auto, 40, items, MARKS, {1: 0.010, 4: 0.0145})
    # step 3 splits on the model's word and measures 1.45x slower: whole from step 4 on; the probes of steps 4
    # and 6 agree (>= DECISIVE), so the exploration ends there instead of at step 10; from step 7 probes come 4, 8
    # and 16 steps apart (each one confirmed the choice)
    assert [step for step, m in enumerate(ran, start=1) if m != 1] == [3, 4, 6, 11, 19, 35]
    assert auto.current == 1


def test_auto_stays_whole_with_local_experts():
    feed = _Feed(hop_s=0.0, compute_s=0.0, hops_per_step=0)  # no hop recorded: the experts are in this process
    auto = _auto(feed, probe_every=2)
    ran = feed.run(auto, 6, [_Item(1)] * 4, MARKS, {1: 0.010})
    assert ran == [1] * 6 and auto.remote is False


def test_one_sequence_never_splits():
    feed = _Feed(hop_s=0.0023, compute_s=0.0002, hops_per_step=4)
    auto = _auto(feed, probe_every=1)
    assert feed.run(auto, 5, [_Item(1)], MARKS, {1: 0.010}) == [1] * 5


def test_engine_default_is_auto_and_local_experts_run_whole(tiny):  # noqa: F811
    eng = Engine(tiny.model, tiny.cfg, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64), backend=tiny.backend)
    assert isinstance(eng.micro, AutoMicroBatches)
    eng.generate(prompts_of([3, 5, 4, 6]), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert eng.micro.remote is False and set(eng.micro.steps_by_m) == {1} and eng.micro.current == 1


class _DelayedExperts(StaticExpertBackend):
    """Local experts behind a simulated hop: the result is ready ``per_row_s`` x rows after dispatch (so half the
    rows come back in half the time, as bytes on a wire), and each hop is recorded as the links record theirs."""

    def __init__(self, inner, per_row_s: float):
        self.inner, self.per_row_s = inner, per_row_s
        self.hops = HopRecorder("delayed-experts")

    def dispatch(self, layer_id, x, topk_idx, topk_weights):
        return self.inner.dispatch(layer_id, x, topk_idx, topk_weights), time.perf_counter(), x.shape[0]

    def combine(self, handle):
        y, sent, rows = handle
        hop = rows * self.per_row_s
        time.sleep(max(0.0, sent + hop - time.perf_counter()))
        self.hops.record(hop, 0, 0, 0)
        return self.inner.combine(y)


def test_engine_feeds_auto_from_a_remote_hop_and_probes_keep_the_tokens(tiny):  # noqa: F811
    """The wiring, not the choice (that depends on this machine's timings; the cases above pin it): the clock sits
    on the MoE layers, hops count as remote, whole steps give costs, probes split, and tokens do not change."""
    from moemesh.attn_node.attach import attach_experts

    prompts = prompts_of([3, 5, 4, 6], seed=3)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64)
    whole = Engine(tiny.model, tiny.cfg, replace(config, micro_batches=1), backend=tiny.backend)
    expected = [o.token_ids for o in whole.generate(prompts, params)]
    delayed = _DelayedExperts(tiny.backend, per_row_s=0.001)
    attach_experts(tiny.model, delayed)
    try:
        eng = Engine(tiny.model, tiny.cfg, config, backend=delayed)
        assert all(isinstance(moe.backend, LayerClock) for moe in tiny.model.moe_layers())
        eng.micro.probe_every = 4
        got = [o.token_ids for o in eng.generate(prompts, params)]
    finally:
        attach_experts(tiny.model, tiny.backend)
    assert got == expected
    decode = eng.micro._buckets[3]  # four sequences decoding
    costs = eng.micro.costs(decode)
    assert eng.micro.remote is True and costs is not None
    assert costs.wait_s > 0 and costs.attn_s > 0 and costs.fixed_s == pytest.approx(0.004)  # 4 rows x 1 ms, no compute
    # the probes of steps 4, 6, 8 and 10 split (or the choice did); into 2, 3 or 4 as this run's timings model it
    assert sum(n for m, n in eng.micro.steps_by_m.items() if m >= 2) >= 2, eng.micro.steps_by_m
