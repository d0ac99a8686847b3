"""LoadStats: routed tokens per (layer, expert) over a sliding window (exact counts, a fake clock)."""

from __future__ import annotations

import pytest
import torch

from moemesh.attn_node.load_stats import LoadStats


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_counts_per_layer_and_expert_ignoring_minus_one():
    clock = Clock()
    stats = LoadStats((1, 3), 4, window_s=60, buckets=6, clock=clock)
    stats.add(1, torch.tensor([[0, 2], [2, 3], [-1, 2]]))
    stats.add(3, torch.tensor([[1, 1]]))
    assert stats.snapshot() == {1: [1, 0, 3, 1], 3: [0, 2, 0, 0]}


def test_old_traffic_ages_out_of_the_window():
    clock = Clock()
    stats = LoadStats((1,), 2, window_s=60, buckets=6, clock=clock)  # 10 s buckets
    stats.add(1, torch.tensor([[0]]))
    clock.t = 35.0
    stats.add(1, torch.tensor([[1]]))
    assert stats.snapshot() == {1: [1, 1]}
    clock.t = 65.0  # the first bucket (0-10 s) is now more than a window old
    assert stats.snapshot() == {1: [0, 1]}
    clock.t = 61.0 + 60.0
    stats.add(1, torch.tensor([[0], [0]]))
    assert stats.snapshot() == {1: [2, 0]}


def test_bad_window_is_refused():
    with pytest.raises(ValueError):
        LoadStats((1,), 2, window_s=0)
