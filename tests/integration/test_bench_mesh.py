"""`moemesh bench --mesh --json` runs end to end and reports the figures the issue names."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moemesh.model.tiny import write_tiny_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def test_bench_mesh_json(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "m", arch="deepseek_v2", hidden_size=64, layers=2, experts=8,
                                  experts_per_token=2)
    proc = subprocess.run(
        [sys.executable, "-m", "moemesh.cli", "bench", "--mesh", "--model", str(model), "--batch", "2",
         "--prompt-len", "4", "--new-tokens", "3", "--hop-samples", "20", "--json"],
        capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("engine_tokens_per_s", "mesh_tokens_per_s", "mesh_no_overlap_tokens_per_s", "mesh_auto_tokens_per_s",
                "hop_us", "tcp_echo_us", "tcp_floor_spin_us", "tcp_floor_one_core_us"):
        assert out[key] > 0, key
    assert out["hop_vs_tcp_floor"] == pytest.approx(out["hop_us"] / out["tcp_floor_spin_us"])
    assert out["tokens_match"] is True
    # auto ran every step (warm-up and timed run) and says how: (3 + 2 steps' prefill and decode) at most
    steps = out["mesh_auto_steps_by_micro_batches"]
    assert set(steps) <= {"1", "2"} and sum(steps.values()) >= 3 + 2, steps
