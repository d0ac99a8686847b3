"""``moemesh profile --json`` on a tiny checkpoint (real expert node processes), read back by ``plan --cluster``."""

from __future__ import annotations

import json

import pytest

from moemesh.cli.main import main
from moemesh.cluster_model import ClusterShape, MeasuredProfile, ModelShape, predict

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_profile_measures_every_table_and_the_model_reads_it(tiny_checkpoint, capsys, tmp_path):
    model = tiny_checkpoint(arch="deepseek_v3", hidden_size=64, layers=2, experts=8, experts_per_token=2)
    rc = main(["profile", "--model", str(model), "--batches", "1,4", "--contexts", "4,12", "--steps", "2",
               "--repeats", "1", "--hop-samples", "5", "--threads", "1", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert sorted((r["batch"], r["context"]) for r in data["attention_us"]) == [(1, 4), (1, 12), (4, 4), (4, 12)]
    assert [r["rows"] for r in data["expert_us"]] == [1, 4]
    assert [r["rows"] for r in data["hop_us"]["grpc"]] == [1, 2, 4]
    assert all(r["us"] > 0 and r["two_nodes_us"] > 0 and 0 <= r["busy"] <= 1 for r in data["hop_us"]["grpc"])
    assert all(r["us"] > 0 for r in data["expert_us"])  # time spent in experts; decode steps are differences
    assert all(isinstance(r["step_us"], float) for r in data["attention_us"])  # (noise may even make one negative)
    assert data["model"]["top_k"] == 2 and data["model"]["experts"] == 8
    # MoE layers to the 2 nodes computing their rows: the nodes' compute and every process's CPU inside each
    layers = data["round_trip_us"]["grpc"]
    assert [r["rows"] for r in layers] == [1, 2, 4]
    assert all(r["us"] > r["node_compute_us"] > 0 and r["cpu_attention_us"] > 0 and r["cpu_experts_us"] > 0
               for r in layers)
    assert data["host_cores"] >= 1
    profile = MeasuredProfile.from_json(data)
    model = ModelShape(2, 1, 64, 2, 8, data["model"]["act_bytes"])
    p = predict(profile, model, ClusterShape(1, 2, 4, 8, 1))
    assert p.tokens_per_s > 0 and p.tpot_ms > 0
    shared = predict(profile, model, ClusterShape(1, 2, 4, 8, 1, shared_host=True))
    assert shared.layer_us >= shared.attention_us + profile.shared_round_trip(4, shared.shape).us
