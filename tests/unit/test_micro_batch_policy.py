"""micro_batch_policy: the layer model and the choice, on hand-computed cases (milliseconds, written as ms)."""

import pytest

from moemesh.attn_node.micro_batch_policy import (LayerCosts, bucket_of, choose, layer_time_s, probe,
                                                  relative_times)

MS = 1e-3


def costs(a, w, c, f, s=None):
    """A, W, C, F (and S, the dispatch call, = F unless given) in ms."""
    return LayerCosts(a * MS, w * MS, (f if s is None else s) * MS, c * MS, f * MS)


BALANCED = costs(1.0, 1.0, 0.2, 0.1)  # attention and hop alike, cheap expert pass
LONG_HOP = costs(1.0, 4.0, 0.2, 0.1)  # the hop four times the attention
WEIGHT_BOUND = costs(1.0, 1.0, 1.0, 0.1)  # the hop is all expert compute: a second weight pass costs it all


@pytest.mark.parametrize("c, m, expected_ms", [
    # m = 1 is A + W
    (BALANCED, 1, 2.0),
    # busy 1 + 0.1 = 1.1; chain 0.5 + fixed 0.3 + (1 - 0.3) / 2 = 1.15; experts 0.4
    (BALANCED, 2, 1.15),
    # busy 1.2; chain 1/3 + 0.3 + 0.7/3 = 0.8667; experts 0.6
    (BALANCED, 3, 1.2),
    # busy 1.1; chain 0.5 + 0.3 + 3.7/2 = 2.65; experts 0.4
    (LONG_HOP, 2, 2.65),
    # busy 1.3; chain 0.25 + 0.3 + 3.7/4 = 1.475; experts 0.8
    (LONG_HOP, 4, 1.475),
    # fixed = min(W 1, F + C 1.1) = 1: busy 1.1; chain 0.5 + 1 + 0 = 1.5; experts 2.0
    (WEIGHT_BOUND, 2, 2.0),
    # W below F + C (shared experts already hid part of the hop): h(m) stays W. busy 1.1, chain 0.5 + 0.2, experts 0.4
    (costs(1.0, 0.2, 0.2, 0.1), 2, 1.1),
    # a slow network, a cheap dispatch call: busy 1 + 0.05; chain 0.5 + fixed 0.7 + 0.3/2 = 1.35; experts 0.4
    (costs(1.0, 1.0, 0.2, 0.5, s=0.05), 2, 1.35),
])
def test_layer_time(c, m, expected_ms):
    assert layer_time_s(c, m) == pytest.approx(expected_ms * MS)


def test_two_micro_batches_when_attention_and_hop_balance():
    assert relative_times(BALANCED, {}, 3) == pytest.approx({1: 1.0, 2: 0.575, 3: 0.6})
    assert choose(BALANCED, {}, 4, current=1, remote=True).micro_batches == 2


def test_more_micro_batches_when_the_hop_is_long():
    # rel: 2 -> 2.65/5 = 0.53, 3 -> max(1.2, 1/3 + 0.3 + 3.7/3 = 1.8667)/5 = 0.3733, 4 -> 1.475/5 = 0.295
    assert relative_times(LONG_HOP, {}, 4) == pytest.approx({1: 1.0, 2: 0.53, 3: 1.8666667 / 5, 4: 0.295})
    assert choose(LONG_HOP, {}, 4, current=1, remote=True).micro_batches == 4
    assert choose(LONG_HOP, {}, 2, current=1, remote=True).micro_batches == 2  # capped by the step's sequences


def test_splitting_does_not_pay_when_the_expert_pass_is_the_hop():
    choice = choose(WEIGHT_BOUND, {}, 4, current=1, remote=True)
    assert choice.micro_batches == 1  # m = 2 predicts 2.0 ms = the same as whole: nothing to gain
    assert choice.reason.startswith("predicted 1.00x")


def test_measured_step_times_win_over_the_model():
    # the model says 2 (0.575x), the probes measured it 30% slower: contention the model cannot see
    assert choose(BALANCED, {1: 0.010, 2: 0.013}, 4, current=1, remote=True).micro_batches == 1
    back = choose(BALANCED, {1: 0.010, 2: 0.013}, 4, current=2, remote=True)
    assert back.micro_batches == 1 and back.reason.startswith("measured 1.00x")


def test_a_small_difference_does_not_switch():
    # 2% faster measured: within the 5% margin, each side keeps what it runs
    assert choose(BALANCED, {1: 0.0100, 2: 0.0098}, 2, current=1, remote=True).micro_batches == 1
    assert choose(BALANCED, {1: 0.0100, 2: 0.0098}, 2, current=2, remote=True).micro_batches == 2
    # 10% faster: switch
    assert choose(BALANCED, {1: 0.0100, 2: 0.0090}, 2, current=1, remote=True).micro_batches == 2


@pytest.mark.parametrize("c, max_m, remote, reason", [
    (BALANCED, 4, False, "local experts"),
    (BALANCED, 1, True, "one sequence"),
    (None, 4, True, "measuring"),
])
def test_one_micro_batch_when_nothing_can_be_decided(c, max_m, remote, reason):
    choice = choose(c, {}, max_m, current=2, remote=remote)
    assert choice.micro_batches == 1 and choice.reason.startswith(reason)


def test_probe_runs_the_other_setting():
    assert probe(1, BALANCED, {1: 0.010, 2: 0.013}, 4) == 2  # the model's best split, whatever was measured
    assert probe(1, LONG_HOP, {}, 4) == 4
    assert probe(2, BALANCED, {}, 4) == 1  # splitting: the probe refreshes the whole step (and A, W, C, F)
    assert probe(1, None, {}, 4) == 1
    assert probe(1, BALANCED, {}, 1) == 1


@pytest.mark.parametrize("tokens, bucket", [(1, 1), (2, 2), (3, 2), (4, 3), (7, 3), (8, 4), (32, 6), (33, 6)])
def test_buckets(tokens, bucket):
    assert bucket_of(tokens) == bucket


@pytest.mark.parametrize("bad", [dict(attn_s=-1.0), dict(wait_s=float("nan"))])
def test_costs_are_checked(bad):
    fields = dict(attn_s=0.0, wait_s=0.0, send_s=0.0, compute_s=0.0, fixed_s=0.0) | bad
    with pytest.raises(ValueError, match=f"LayerCosts.{next(iter(bad))}"):
        LayerCosts(**fields)


def test_unmeasured_splits_are_scaled_by_the_measured_ones_error():
    # m = 2 measured 1.3x where the model said 0.575x: m = 3's 0.6x becomes 0.6 * 1.3 / 0.575
    rel = relative_times(BALANCED, {1: 0.010, 2: 0.013}, 3)
    assert rel == pytest.approx({1: 1.0, 2: 1.3, 3: 0.6 * 1.3 / 0.575})
