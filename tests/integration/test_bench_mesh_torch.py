"""`moemesh bench --mesh --transport torch --json`: torch and gRPC figures side by side from one run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moemesh.model.tiny import write_tiny_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def test_bench_mesh_torch_json(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "m", arch="deepseek_v2", hidden_size=64, layers=2, experts=8,
                                  experts_per_token=2)
    proc = subprocess.run(
        [sys.executable, "-m", "moemesh.cli", "bench", "--mesh", "--model", str(model), "--batch", "2",
         "--prompt-len", "4", "--new-tokens", "3", "--hop-samples", "20", "--transport", "torch", "--json"],
        capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["transports"] == ["grpc", "torch"]
    for key in ("mesh_tokens_per_s", "hop_us", "torch_mesh_tokens_per_s", "torch_mesh_no_overlap_tokens_per_s",
                "torch_mesh_auto_tokens_per_s", "torch_hop_us", "torch_hop_with_expert_us", "tcp_echo_us",
                "torch_hop_vs_tcp_echo", "torch_hop_vs_tcp_floor"):
        assert out[key] > 0, key
    assert out["tokens_match"] is True
    assert out["torch_fallback_messages"] == 0
