"""kernels/bench.py: its --dry-run plumbing on the CPU, and its one-line exit where there is no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

OPS = {"mla_decode", "sparse_mla", "store_latent", "fused_moe", "fused_moe_fp8", "route"}


def _bench(*args: str) -> subprocess.CompletedProcess:
    # As on a GPU machine: the kernels compiled, not interpreted (conftest sets TRITON_INTERPRET=1 for this process).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "moemesh.kernels.bench", *args], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.mark.slow
def test_dry_run_prints_a_checked_row_for_every_op_and_size():
    proc = _bench("--dry-run", "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {r["op"] for r in rows} == OPS
    for r in rows:
        assert r["ok"] and "error" not in r, r
        assert r["ms_torch"] is not None and r["ms_triton"] is None and r["bytes"] > 0, r
    models = {op: {r["model"] for r in rows if r["op"] == op} for op in OPS}
    assert models["fused_moe"] == models["route"] == {"v2-lite", "v2", "v3"}
    assert models["fused_moe_fp8"] == {"v3"} and models["sparse_mla"] == {"v3.2"}
    assert models["mla_decode"] == {"v2-lite", "v2/v3"}
    per_op = {op: sum(r["op"] == op for r in rows) for op in OPS}
    assert per_op == {"mla_decode": 18, "store_latent": 3, "fused_moe": 9, "fused_moe_fp8": 3, "route": 9,
                      "sparse_mla": 6}


@pytest.mark.slow
def test_dry_run_table_and_size_filter():
    proc = _bench("--dry-run", "--sizes", "v2", "--ops", "moe_fp8,route")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "4.8 TB/s" in lines[1] and "989" in lines[1] and "1979" in lines[1]
    body = [line for line in lines if not line.startswith("#") and not line.startswith("op ")]
    assert len(body) == 6 and all(line.startswith("route") for line in body)  # V2 sizes: no FP8 rows
    assert "v3" not in proc.stdout.replace("v2/v3", "")
    assert lines[-1] == "# 6 rows, 0 failed"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_a_gpu_it_exits_2_with_one_line():
    proc = _bench("--json")
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0] and "--dry-run" in lines[0], lines
