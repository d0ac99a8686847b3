"""The workload of `moemesh bench --serving`: seeded arrivals, length distributions, the lengths file."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moemesh.cli.serving_workload import (LengthDist, ServingRequest, WorkloadError, arrival_times, build_workload,
                                          draw_lengths, read_lengths_jsonl, static_batches)


def test_poisson_arrivals_with_a_fixed_seed():
    # numpy's PCG64 stream for seed [0, 0]: first request at 0, then exponential gaps of mean 1/2 s
    assert arrival_times(5, 2.0, 1.0, seed=0) == pytest.approx(
        [0.0, 0.3399659519844548, 0.8497645027173871, 0.8596678340119148, 0.8608024973525289], rel=1e-12)
    assert arrival_times(4, 2.0, 0.5, seed=7) == pytest.approx(
        [0.0, 0.41469522451592433, 1.2260997081939058, 1.3161995067913128], rel=1e-12)


def test_arrivals_are_the_gamma_process_vllm_draws():
    times = arrival_times(6, 4.0, 0.25, seed=3)
    gaps = np.random.default_rng([3, 0]).gamma(shape=0.25, scale=1 / (4.0 * 0.25), size=5)
    assert times == pytest.approx([0.0, *np.cumsum(gaps)], rel=1e-12)


def test_the_mean_gap_is_one_over_the_rate():
    for burstiness in (0.5, 1.0, 3.0):
        times = arrival_times(4001, 8.0, burstiness, seed=1)
        assert times[-1] / 4000 == pytest.approx(1 / 8.0, rel=0.05)
        assert all(b >= a for a, b in zip(times, times[1:]))


def test_rate_inf_sends_everything_at_once_and_bad_rates_are_refused():
    assert arrival_times(3, math.inf) == [0.0, 0.0, 0.0]
    assert arrival_times(0, 1.0) == []
    with pytest.raises(WorkloadError, match="--rate"):
        arrival_times(3, 0.0)
    with pytest.raises(WorkloadError, match="--burstiness"):
        arrival_times(3, 1.0, burstiness=0.0)


def test_length_distributions():
    assert LengthDist.parse("fixed:7", "--input-len") == LengthDist(7, 7)
    assert LengthDist.parse("uniform:3:9", "--input-len") == LengthDist(3, 9)
    assert str(LengthDist(7, 7)) == "fixed:7" and str(LengthDist(3, 9)) == "uniform:3:9"
    assert draw_lengths(4, LengthDist(3, 9), LengthDist(5, 5), seed=0) == [(6, 5), (9, 5), (9, 5), (6, 5)]
    drawn = [p for p, _ in draw_lengths(2000, LengthDist(3, 5), LengthDist(1, 1), seed=2)]
    assert set(drawn) == {3, 4, 5}  # both ends included


@pytest.mark.parametrize("text, needle", [
    ("normal:3", "expected fixed:N or uniform:LO:HI"),
    ("fixed:x", "expected fixed:N or uniform:LO:HI"),
    ("fixed", "expected fixed:N or uniform:LO:HI"),
    ("uniform:3", "expected fixed:N or uniform:LO:HI"),
    ("fixed:0", "1 <= LO <= HI"),
    ("uniform:5:3", "1 <= LO <= HI"),
])
def test_bad_length_distributions_name_the_flag(text, needle):
    with pytest.raises(WorkloadError) as exc:
        LengthDist.parse(text, "--output-len")
    assert str(exc.value).startswith("--output-len: ") and needle in str(exc.value)


def test_the_lengths_file(tmp_path):
    path = tmp_path / "lengths.jsonl"
    path.write_text('{"prompt_len": 12, "output_len": 3}\n\n{"output_len": 1, "prompt_len": 2, "note": "x"}\n')
    assert read_lengths_jsonl(path) == [(12, 3), (2, 1)]


@pytest.mark.parametrize("text, needle", [
    ('{"prompt_len": 1, "output_len": 1}\n{"prompt_len": 1,', "line 2: not JSON"),
    ('[1, 2]', 'line 1: expected an object like {"prompt_len": 32, "output_len": 64}'),
    ('{"prompt_len": 4}', "line 1: 'output_len' must be an integer >= 1 (missing)"),
    ('{"prompt_len": 0, "output_len": 4}', "line 1: 'prompt_len' must be an integer >= 1 (got 0)"),
    ('{"prompt_len": 2.5, "output_len": 4}', "line 1: 'prompt_len' must be an integer >= 1 (got 2.5)"),
    ('{"prompt_len": true, "output_len": 4}', "line 1: 'prompt_len' must be an integer >= 1 (got True)"),
    ('\n\n', "no lines with lengths"),
])
def test_lengths_file_errors_name_the_line_and_field(tmp_path, text, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(WorkloadError) as exc:
        read_lengths_jsonl(path)
    assert str(exc.value).startswith(f"--lengths-file {path}") and needle in str(exc.value)


def test_a_missing_lengths_file(tmp_path):
    with pytest.raises(WorkloadError, match="cannot read it"):
        read_lengths_jsonl(tmp_path / "absent.jsonl")


def test_the_workload_is_seeded_and_within_the_vocabulary():
    lengths, arrivals = [(3, 2), (1, 4), (5, 1)], [0.0, 0.5, 0.75]
    a = build_workload(lengths, arrivals, vocab_size=10, seed=0)
    assert a == build_workload(lengths, arrivals, vocab_size=10, seed=0)
    assert [(r.prompt_len, r.output_len, r.arrival_s) for r in a] == [(3, 2, 0.0), (1, 4, 0.5), (5, 1, 0.75)]
    assert a[0].prompt_ids == (9, 2, 4)  # numpy PCG64, seed [0, 2]
    assert all(2 <= t < 10 for r in a for t in r.prompt_ids)
    assert [r.prompt_ids for r in build_workload(lengths, arrivals, 10, seed=1)] != [r.prompt_ids for r in a]
    with pytest.raises(WorkloadError, match="vocabulary"):
        build_workload(lengths, arrivals, vocab_size=2, seed=0)


def test_static_batches_follow_arrival_order():
    reqs = [ServingRequest(i, at, (2,), 1) for i, at in enumerate([0.3, 0.1, 0.2, 0.1, 0.9])]
    assert [[r.index for r in b] for b in static_batches(reqs, 2)] == [[1, 3], [2, 0], [4]]

