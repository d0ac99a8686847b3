"""vLLM's serving metrics on hand-made records: TTFT, TPOT (first token excluded), ITL, E2EL, goodput."""

from __future__ import annotations

import pytest

from moemesh.cli.serving_metrics import RequestRecord, format_table, parse_goodput, summarize
from moemesh.cli.serving_workload import WorkloadError

P = [50.0, 90.0, 99.0]


def records() -> list[RequestRecord]:
    return [
        # ttft 0.1, e2el 0.6, tpot (0.6 - 0.1) / 2 = 0.25, itl 0.2 0.3
        RequestRecord(0, prompt_len=4, expected_output_len=3, send_s=0.0, chunk_s=[0.1, 0.3, 0.6], output_tokens=3,
                      end_s=0.6),
        # one token: ttft 0.2, e2el 0.25, no tpot, no itl
        RequestRecord(1, prompt_len=2, expected_output_len=1, send_s=1.0, chunk_s=[1.2], output_tokens=1, end_s=1.25),
        # ttft 0.4, e2el 1.0, tpot 0.6 / 3 = 0.2, itl 0.1 0.1 0.4
        RequestRecord(2, prompt_len=6, expected_output_len=4, send_s=0.5, chunk_s=[0.9, 1.0, 1.1, 1.5],
                      output_tokens=4, end_s=1.5),
        RequestRecord(3, prompt_len=9, expected_output_len=5, send_s=0.7, chunk_s=[0.8], output_tokens=1,
                      error="MeshError: UNAVAILABLE"),
    ]


def test_per_request_definitions():
    a, b, c, failed = records()
    assert (a.ttft, a.e2el, a.tpot) == pytest.approx((0.1, 0.6, 0.25))
    assert a.itls == pytest.approx([0.2, 0.3])
    assert (b.ttft, b.e2el, b.tpot, b.itls) == (pytest.approx(0.2), pytest.approx(0.25), None, [])
    assert c.tpot == pytest.approx(0.2) and c.itls == pytest.approx([0.1, 0.1, 0.4])
    assert not failed.ok and failed.to_json()["error"] == "MeshError: UNAVAILABLE" and "ttft_ms" not in failed.to_json()


def test_summary_is_numpy_percentiles_in_ms():
    s = summarize(records(), duration_s=2.0, percentiles=P, goodput={"ttft": 250.0, "tpot": 240.0})
    expected = {
        "completed": 3, "failed": 1, "duration_s": 2.0, "total_input_tokens": 12, "total_output_tokens": 8,
        "request_throughput": 1.5, "output_throughput": 4.0, "total_token_throughput": 10.0,
        # a: tpot 250 > 240; b: ttft 200, tpot counts 0; c: ttft 400 > 250 -> one good request in 2 s
        "request_goodput": 0.5,
        # ttft [100, 200, 400]; linear interpolation: p90 at rank 1.8 = 200 + 0.8 * 200
        "mean_ttft_ms": 700 / 3, "median_ttft_ms": 200.0, "p50_ttft_ms": 200.0, "p90_ttft_ms": 360.0,
        "p99_ttft_ms": 396.0, "std_ttft_ms": pytest.approx(124.7219, abs=1e-4),
        # tpot [250, 200] (b has one token)
        "mean_tpot_ms": 225.0, "median_tpot_ms": 225.0, "p50_tpot_ms": 225.0, "p90_tpot_ms": 245.0,
        "p99_tpot_ms": 249.5, "std_tpot_ms": 25.0,
        # itl [200, 300, 100, 100, 400]: every gap of every request
        "mean_itl_ms": 220.0, "median_itl_ms": 200.0, "p50_itl_ms": 200.0, "p90_itl_ms": 360.0,
        "p99_itl_ms": 396.0, "std_itl_ms": pytest.approx(116.6190, abs=1e-4),
        # e2el [600, 250, 1000]
        "mean_e2el_ms": 1850 / 3, "median_e2el_ms": 600.0, "p50_e2el_ms": 600.0, "p90_e2el_ms": 920.0,
        "p99_e2el_ms": 992.0, "std_e2el_ms": pytest.approx(306.4129, abs=1e-4),
    }
    assert s.keys() == expected.keys()
    for key, value in expected.items():
        assert s[key] == pytest.approx(value), key


def test_no_completed_request_counts_zero_as_vllm():
    s = summarize(records()[3:], duration_s=1.0, percentiles=[99.0])
    assert (s["completed"], s["failed"], s["request_throughput"], s["mean_ttft_ms"], s["p99_itl_ms"]) == (0, 1, 0, 0, 0)
    assert "request_goodput" not in s


def test_goodput_flags():
    assert parse_goodput(["ttft:500", "tpot:50.5", "e2el:0"]) == {"ttft": 500.0, "tpot": 50.5, "e2el": 0.0}
    assert parse_goodput(None) == {}
    with pytest.raises(WorkloadError, match="one of ttft, tpot, e2el"):
        parse_goodput(["itl:5"])
    with pytest.raises(WorkloadError, match="METRIC:MILLISECONDS"):
        parse_goodput(["ttft:-1"])
    with pytest.raises(WorkloadError, match="METRIC:MILLISECONDS"):
        parse_goodput(["ttft"])


def test_the_table_is_vllms_with_a_column_per_side():
    one = summarize(records()[:3], 2.0, [99.0])
    text = format_table({"moemesh": one, "transformers": {**one, "completed": 2}}, [99.0], ["Target: embedded"])
    lines = text.splitlines()
    assert lines[0] == "=" * 21 + " Serving Benchmark Result " + "=" * 21
    assert lines[1] == "Target: embedded"
    assert lines[2] == " " * 40 + "       moemesh  transformers"
    assert lines[3] == "Successful requests:" + " " * 20 + "             3             2"
    assert "Request throughput (req/s):" + " " * 13 + "          1.50          1.50" in lines
    assert "P99 TTFT (ms):" + " " * 26 + "        396.00        396.00" in lines
    assert [line.strip("-") for line in lines if line.startswith("---")] == [
        "Time to First Token", "Time per Output Token (excl. 1st token)", "Inter-token Latency",
        "End-to-end Latency"]
    assert lines[-1] == "=" * 68
    assert "Failed requests:" not in text and "goodput" not in text


def test_a_single_side_has_no_column_header():
    text = format_table({"moemesh": summarize(records(), 2.0, [50.0], {"ttft": 1000})}, [50.0])
    assert text.splitlines()[1].startswith("Successful requests:")
    assert "Failed requests:" in text and "Request goodput (req/s):" in text
    assert len(text.splitlines()[0]) == 54
