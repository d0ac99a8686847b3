"""The profile's pure parts: the rows its round trips route and the CPU it reads (moemesh/cli/profile_remote.py),
and the decode-step samples it cuts from its marks (moemesh/cli/profile.py)."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import torch

from moemesh.cli.profile import step_samples
from moemesh.cli.profile_remote import process_cpu_s, routed_rows


def test_routed_rows_pick_k_distinct_experts_per_row_and_repeat_by_seed():
    cfg = SimpleNamespace(hidden_size=6, n_routed_experts=8, num_experts_per_tok=3)
    x, idx, w = routed_rows(cfg, 50, "cpu")
    assert x.shape == (50, 6) and idx.shape == (50, 3) and w.shape == (50, 3)
    assert all(len(set(row)) == 3 for row in idx.tolist()) and idx.min() >= 0 and idx.max() <= 7
    assert torch.equal(w.sum(dim=1), torch.ones(50))
    assert len(set(idx.flatten().tolist())) == 8  # 150 picks reach every expert
    again = routed_rows(cfg, 50, "cpu")
    assert torch.equal(again[1], idx) and torch.equal(again[0], x)


def test_process_cpu_counts_this_process_and_none_for_a_missing_one():
    before = process_cpu_s(os.getpid())
    if before is None:
        pytest.skip("no /proc/PID/task/*/schedstat on this system")
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # 50 ms of CPU
        pass
    assert process_cpu_s(os.getpid()) - before >= 0.04
    assert process_cpu_s(2 ** 22 + 12345) is None  # above the kernel's pid limit: no such process


def test_a_step_runs_from_one_first_moe_layer_to_the_next_with_the_expert_time_between():
    # marks: (when the step's first MoE layer began, routed-expert seconds so far)
    marks = [(10.0, 0.0), (10.5, 0.125), (11.25, 0.25)]
    assert step_samples(marks) == [(0.5, 0.125), (0.75, 0.125)]
    assert step_samples(marks[:1]) == [] and step_samples([]) == []
    # one-token prompts: the prefill has the batch's rows too, so the first mark is the prefill's
    assert step_samples(marks, prompt_len=1) == [(0.75, 0.125)]
