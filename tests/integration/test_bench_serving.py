"""`moemesh bench --serving` end to end: an embedded mesh (`moemesh up` processes) and the transformers
baseline on one tiny checkpoint, the same requests through both, every figure in the JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moemesh.cli.serving_metrics import METRICS
from moemesh.model.tiny import write_tiny_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]


def test_embedded_mesh_and_transformers_baseline(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "m", arch="deepseek_v2", hidden_size=64, layers=2, experts=4,
                                  experts_per_token=2)
    lengths = tmp_path / "lengths.jsonl"
    lengths.write_text("".join(json.dumps({"prompt_len": p, "output_len": o}) + "\n"
                               for p, o in [(5, 3), (9, 1), (3, 6), (7, 4), (4, 2)]))
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, "-m", "moemesh.cli", "bench", "--serving", "--model", str(model), "--expert-nodes", "1",
         "--lengths-file", str(lengths), "--rate", "40", "--max-concurrency", "4", "--goodput", "ttft:60000",
         "--baseline", "transformers", "--baseline-batch", "2", "--json", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Serving Benchmark Result" in proc.stdout and "moemesh  transformers" in proc.stdout
    figures = json.loads(out.read_text())
    config = figures["config"]
    assert (config["target"], config["num_prompts"], config["rate"], config["baseline_batch"]) == ("embedded", 5, 40.0, 2)
    for side in ("moemesh", "transformers"):
        s = figures[side]
        assert (s["completed"], s["failed"], s["total_input_tokens"], s["total_output_tokens"]) == (5, 0, 28, 16), side
        assert [r["output_tokens"] for r in s["requests"]] == [3, 1, 6, 4, 2], side  # EOS ignored: as drawn
        assert [r["expected_output_len"] for r in s["requests"]] == [3, 1, 6, 4, 2], side
        for name in METRICS:
            for stat in ("mean", "median", "std", "p50", "p90", "p99"):
                assert s[f"{stat}_{name}_ms"] >= 0, (side, stat, name)
        assert s["duration_s"] > 0 and s["request_throughput"] > 0 and s["output_throughput"] > 0
        assert s["request_goodput"] > 0
        for r in s["requests"]:
            assert 0 < r["ttft_ms"] <= r["e2el_ms"] and len(r["itl_ms"]) == r["output_tokens"] - 1, (side, r)
        assert s["p99_ttft_ms"] >= s["p50_ttft_ms"] and s["p99_e2el_ms"] >= s["p99_ttft_ms"]
