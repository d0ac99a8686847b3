"""The cluster model's arithmetic on hand-computed cases (moemesh/cluster_model.py, moemesh/hardware.py)."""

from __future__ import annotations

import json

import pytest

from moemesh.cluster_model import (ClusterShape, MeasuredProfile, ModelError, ModelShape, destinations, interp,
                                   monotone, predict, recommend)
from moemesh.hardware import Hardware, LayerDims, RooflineProfile

MODEL = ModelShape(n_layers=4, n_moe_layers=3, hidden_size=10, top_k=2, n_experts=8, act_bytes=2)


class Linear:
    """attn = b + c / 10, experts = assignments + hosted, hop = bytes / 100 + destinations, overhead = 7."""

    hop_busy = 0.0

    def attn_us(self, batch, context):
        return batch + context / 10

    def expert_us(self, assignments, hosted):
        return assignments + hosted

    def hop_us(self, nbytes, dest, nodes):
        return nbytes / 100 + dest

    def overhead_us(self, batch):
        return 7.0


class Constant:
    hop_busy = 0.0

    def attn_us(self, batch, context):
        return 100.0

    def expert_us(self, assignments, hosted):
        return 80.0

    def hop_us(self, nbytes, dest, nodes):
        return 50.0

    def overhead_us(self, batch):
        return 1000.0


def test_interp_is_piecewise_linear_extended_and_never_negative():
    points = [(1.0, 10.0), (3.0, 30.0), (5.0, 34.0)]
    assert interp(points, 2) == 20.0 and interp(points, 4) == 32.0
    assert interp(points, 7) == 38.0  # along the last segment
    assert interp(points, 0) == 0.0 and interp(points, -5) == 0.0  # 10 + 10 x (-6) clamps at 0
    assert interp([(4.0, 9.0)], 100) == 9.0
    with pytest.raises(ModelError):
        interp([], 1)


def test_destinations_of_a_token():
    assert destinations(2, 4) == pytest.approx(4 * (1 - 0.75 ** 2)) == pytest.approx(1.75)
    assert destinations(8, 1) == 1.0


def test_predict_passes_each_cost_its_shape():
    # A=2, N=4, B=32, c=100, m=2: b = 16; Ta = 16 + 10 = 26; Te = (2 x 16 x 2 / 4 = 16 assignments) + 2 hosted
    # = 18; Tc = 16 rows x (2 x 10 x 2 + 2 x 12 = 64 B) / 100 + 1.75 destinations = 11.99
    p = predict(Linear(), MODEL, ClusterShape(2, 4, 32, 100, 2))
    assert (p.attention_us, p.expert_us) == (26.0, 18.0) and p.hop_us == pytest.approx(11.99)
    # T_layer = max(2 x 26, 2 x 18, 26 + 11.99 + 18 = 55.99): the round trip
    assert p.bound == "round trip" and p.layer_us == pytest.approx(55.99)
    # TPOT = 3 x 55.99 + (4 - 3) x 2 x 26 + 7 = 226.97 us; 2 x 32 tokens per step
    assert p.tpot_ms == pytest.approx(0.22697)
    assert p.tokens_per_s == pytest.approx(64 / 226.97e-6)
    assert p.attention_utilisation == pytest.approx(52 / 55.99) and p.expert_utilisation == pytest.approx(36 / 55.99)
    assert p.min_micro_batches == 3  # ceil(2 (1 + 11.99 / 26)) = ceil(2.92)


def test_micro_batches_overlap_until_a_node_is_the_bottleneck():
    one = predict(Constant(), MODEL, ClusterShape(1, 2, 32, 0, 1))
    assert one.layer_us == 230.0 and one.tpot_ms == pytest.approx((3 * 230 + 100 + 1000) / 1000)  # 100+50+80
    two = predict(Constant(), MODEL, ClusterShape(1, 2, 32, 0, 2))
    assert two.layer_us == 230.0 and two.bound == "round trip"  # 2 x 100 = 200 < 230
    three = predict(Constant(), MODEL, ClusterShape(1, 2, 32, 0, 3))
    assert three.layer_us == 300.0 and three.bound == "attention" and three.attention_utilisation == 1.0
    assert three.expert_utilisation == pytest.approx(240 / 300) and three.min_micro_batches == 3


def test_a_busy_sender_pays_for_each_message_and_overlaps_less():
    busy = Constant()
    busy.hop_busy = 0.5  # half of each 50 us round trip is the attention node's own CPU
    one = predict(busy, MODEL, ClusterShape(1, 2, 32, 0, 1))
    assert one.layer_us == 100 + 50 + 80 and one.bound == "round trip"
    two = predict(busy, MODEL, ClusterShape(1, 2, 32, 0, 2))
    assert two.layer_us == 2 * (100 + 25) and two.bound == "attention"  # 250 > 230: no gain from overlap
    assert two.attention_utilisation == 1.0


def test_recommend_maximises_tokens_per_node_within_the_tpot():
    best = recommend(Constant(), MODEL, context=0, attention_nodes=[1, 2], expert_nodes=[1], batches=[8, 16],
                     micro_batches=[1])
    # TPOT is 1.79 ms whatever the shape: 2 x 16 / 3 nodes beats 1 x 16 / 2 nodes
    assert (best.shape.attention_nodes, best.shape.batch) == (2, 16)
    assert recommend(Constant(), MODEL, context=0, tpot_ms=1.0, attention_nodes=[1], expert_nodes=[1],
                     batches=[8], micro_batches=[1]) is None


def test_bad_shapes_are_named():
    with pytest.raises(ModelError, match="expert_nodes must be >= 1"):
        predict(Constant(), MODEL, ClusterShape(1, 0, 8, 0, 1))


def test_monotone_pools_what_falls():
    assert monotone([(1, 5.0), (2, 3.0), (3, 7.0)]) == [(1, 4.0), (2, 4.0), (3, 7.0)]
    # the falling tail pools back until the fit rises: 1, then (9 + 2 + 1) / 3 = 4 three times
    assert monotone([(1, 1.0), (2, 9.0), (4, 2.0), (8, 1.0)]) == [(1, 1.0), (2, 4.0), (4, 4.0), (8, 4.0)]
    assert monotone([(1, 1.0), (2, 2.0)]) == [(1, 1.0), (2, 2.0)] and monotone([]) == []


def test_a_noisy_profile_is_read_non_decreasing():
    data = {"model": {"top_k": 1}, "attention_us": [
        {"batch": 1, "context": 10, "us": 100}, {"batch": 32, "context": 10, "us": 300},
        {"batch": 64, "context": 10, "us": 100}],
        "expert_us": [{"rows": 1, "us": 50}, {"rows": 64, "us": 30}],
        "hop_us": {"grpc": [{"bytes": 100, "us": 200}, {"bytes": 300, "us": 400}]},
        "overhead_us": [{"batch": 1, "us": 0.0}]}
    profile = MeasuredProfile.from_json(data)
    assert profile.attention[10] == [(1.0, 100.0), (32.0, 200.0), (64.0, 200.0)]
    assert profile.expert == [(1.0, 40.0), (64.0, 40.0)]


def test_a_measured_profile_interpolates_its_tables():
    data = {"model": {"top_k": 2}, "attention_us": [
        {"batch": 1, "context": 10, "us": 10}, {"batch": 9, "context": 10, "us": 50},
        {"batch": 1, "context": 30, "us": 30}, {"batch": 9, "context": 30, "us": 90}],
        "expert_us": [{"rows": 1, "us": 5}, {"rows": 5, "us": 25}],
        "hop_us": {"grpc": [{"bytes": 100, "us": 200}, {"bytes": 300, "us": 400}]},
        "overhead_us": [{"batch": 1, "us": 0.0}]}
    profile = MeasuredProfile.from_json(json.loads(json.dumps(data)))
    assert profile.attn_us(5, 10) == 30.0 and profile.attn_us(5, 30) == 60.0 and profile.attn_us(5, 20) == 45.0
    assert profile.expert_us(6, 4) == 15.0  # 6 assignments = 3 rows of top-2
    assert profile.hop_us(200, 3, 1) == 300.0
    two = MeasuredProfile.from_json({**data, "hop_us": {"grpc": [
        {"bytes": 100, "us": 200, "two_nodes_us": 260, "busy": 0.5}, {"bytes": 300, "us": 400, "two_nodes_us": 500,
                                                                      "busy": 0.3}]}})
    assert two.hop_busy == pytest.approx(0.4)
    # 200 B: 300 us to one node, 380 to two; each further node adds another 80
    assert two.hop_us(200, 1.9, 2) == 380.0 and two.hop_us(200, 1.9, 4) == 540.0
    with pytest.raises(ModelError, match="no hop measurements for transport 'torch'"):
        MeasuredProfile.from_json(data, "torch")
    with pytest.raises(ModelError, match="not a moemesh profile"):
        MeasuredProfile.from_json({"attention_us": []})


UNIT_HW = Hardware("unit", hbm_tb_s=1.0, fp8_tflops=1000, bf16_tflops=500, nic_gb_s=10, hbm_gb=1,
                   hop_latency_us=20, gemm_eff=1, mla_bw_eff=1, mla_flops_eff=1, launch_us=0)
DIMS = LayerDims(hidden=100, heads=2, q_lora_rank=None, kv_lora_rank=16, qk_nope=8, qk_rope=4, v_head=8,
                 moe_inter=50, n_shared=1, n_experts=4)


def test_layer_dims_count_parameters():
    # q 2 x 12 x 100 = 2400; kv_a 100 x 20 = 2000; kv_b 16 x 2 x 16 = 512; o 2 x 8 x 100 = 1600;
    # shared 3 x 100 x 50 = 15000; gate 100 x 4 = 400
    assert DIMS.attention_params == 2400 + 2000 + 512 + 1600 + 15000 + 400 == 21912
    assert DIMS.expert_params == 15000


def test_roofline_costs_by_hand():
    roof = RooflineProfile(UNIT_HW, DIMS)
    # 1 TB/s = 1e6 bytes per us: 21912 FP8 weight bytes -> 0.021912 us; no cache; compute 2 x 21912 / 1e9 us
    assert roof.attn_us(1, 0) == pytest.approx(21912 / 1e6)
    # batch 10, context 100: cache 10 x 100 x 20 x 2 = 40000 B -> 0.04 us; memory 0.061912 us; compute:
    # projections 2 x 21912 x 10 / 1e9 + MLA 2 x 10 x 100 x 2 x (32 + 4) / 5e8 = 0.00043824 + 0.000288
    assert roof.attn_us(10, 100) == pytest.approx(0.061912)
    # one assignment on one hosted expert: its 15000 weight bytes
    assert roof.expert_us(1, 1) == pytest.approx(15000 / 1e6)
    # 4 hosted, 2 assignments: 4 (1 - 0.75^2) = 1.75 experts hit
    assert roof.expert_us(2, 4) == pytest.approx(1.75 * 15000 / 1e6)
    assert roof.hop_us(1e4, 2, 4) == pytest.approx(20 + 2e4 / 1e4)  # 10 GB/s = 1e4 bytes per us


def test_roofline_says_when_a_shape_does_not_fit():
    roof = RooflineProfile(UNIT_HW, DIMS)
    model = ModelShape(4, 3, 100, 2, 4)
    assert roof.misfit(model, ClusterShape(1, 1, 1, 10, 1)) is None
    # 0.9 GB budget: 4 experts x 3 layers x 15000 B fit, a cache of 10^7 tokens x 40 B x 4 layers (1.6 GB) does not
    assert roof.misfit(model, ClusterShape(1, 1, 10000, 1000, 1)) == (
        "attention weights and a cache of 10000 x 1000 tokens need 2 GB per attention node")
    assert roof.misfit(ModelShape(4, 3, 100, 2, 100000), ClusterShape(1, 1, 1, 10, 1)) == (
        "100000 experts x 3 layers need 4 GB per expert node")


def test_a_shared_host_runs_micro_batches_one_after_another():
    # Constant costs: Ta 100, Te 80, Tc 50 per micro-batch. Apart, 2 micro-batches: max(200, 160, 230) = 230;
    # on one host: max(200, 160, 2 x 230) = 460; one micro-batch is the same either way (230).
    apart = predict(Constant(), MODEL, ClusterShape(1, 2, 8, 0, 2))
    shared = predict(Constant(), MODEL, ClusterShape(1, 2, 8, 0, 2, shared_host=True))
    assert (apart.layer_us, apart.bound) == (230.0, "round trip")
    assert (shared.layer_us, shared.bound) == (460.0, "round trip")
    assert predict(Constant(), MODEL, ClusterShape(1, 2, 8, 0, 1, shared_host=True)).layer_us == 230.0
    assert shared.to_json()["shape"]["shared_host"] is True


def _round_trip_profile(cores=2, transport="grpc"):
    layers = [{"rows": 4, "us": 300, "node_compute_us": 60, "cpu_attention_us": 200, "cpu_experts_us": 250},
              {"rows": 8, "us": 340, "node_compute_us": 80, "cpu_attention_us": 260, "cpu_experts_us": 300}]
    return MeasuredProfile.from_json({
        "model": {"top_k": 2}, "attention_us": [{"batch": 4, "context": 10, "us": 100},
                                                 {"batch": 8, "context": 10, "us": 140}],
        "expert_us": [{"rows": 1, "us": 5}, {"rows": 8, "us": 40}],
        "hop_us": {"grpc": [{"bytes": 100, "us": 200}, {"bytes": 1000, "us": 200}]},
        "round_trip_us": {transport: layers}, "host_cores": cores, "overhead_us": [{"batch": 1, "us": 0.0}]})


def test_a_shared_host_takes_the_measured_round_trip_with_expert_work():
    profile = _round_trip_profile()
    # m = 1, b = 8: Ta 140, R 340 (node compute 80 of it): 140 + 340 = 480
    one = predict(profile, MODEL, ClusterShape(1, 2, 8, 10, 1, shared_host=True))
    assert (one.layer_us, one.bound, one.expert_us, one.hop_us) == (480.0, "round trip", 80.0, 260.0)
    assert one.tpot_ms == pytest.approx((3 * 480 + 140) / 1000)  # 3 MoE layers, 1 dense layer of Ta
    # m = 2, b = 4: Ta 100, R 300: 2 x (100 + 300) = 800
    two = predict(profile, MODEL, ClusterShape(1, 2, 8, 10, 2, shared_host=True))
    assert (two.layer_us, two.bound) == (800.0, "round trip") and two.tpot_ms == pytest.approx(2.6)
    # apart, the round trip is the hop table's (200) + Te (8 assignments = 4 rows of top-2: 20): unchanged
    apart = predict(profile, MODEL, ClusterShape(1, 2, 8, 10, 1))
    assert (apart.hop_us, apart.expert_us, apart.layer_us) == (200.0, 20.0, 360.0)


def test_a_measured_round_trip_predicts_only_the_mesh_it_measured():
    with pytest.raises(ModelError, match="--attention-nodes 1 --expert-nodes 2, got 1 and 4"):
        predict(_round_trip_profile(), MODEL, ClusterShape(1, 4, 8, 10, 1, shared_host=True))
    # another transport's round trips are not this one's: the composed Ta + Tc + Te (140 + 200 + 20)
    other = predict(_round_trip_profile(transport="torch"), MODEL, ClusterShape(1, 4, 8, 10, 1, shared_host=True))
    assert other.layer_us == 140 + 200 + 10  # 4 nodes: 8 x 2 / 4 = 4 assignments = 2 rows: 10
