"""``moemesh plan --cluster``: predictions from a profile file or a hardware preset, JSON fields, bad input."""

from __future__ import annotations

import json

import pytest

from moemesh.model.tiny import tiny_config_dict

from tests.unit.test_plan_cmd import _plan, _write

PROFILE = {"model": {"top_k": 2, "act_bytes": 4}, "attention_us": [
    {"batch": 1, "context": 8, "us": 100}, {"batch": 64, "context": 8, "us": 100}],
    "expert_us": [{"rows": 1, "us": 80}, {"rows": 64, "us": 80}],
    "hop_us": {"grpc": [{"bytes": 1, "us": 50}, {"bytes": 10 ** 6, "us": 50}]},
    "overhead_us": [{"batch": 1, "us": 1000}]}


@pytest.fixture
def model_dir(tmp_path):
    cfg = tiny_config_dict(arch="deepseek_v3", hidden_size=64, experts=8, experts_per_token=2)
    (tmp_path / "model").mkdir()
    _write(tmp_path / "model" / "config.json", cfg)
    return str(tmp_path / "model"), cfg


def test_a_fixed_shape_from_a_measured_profile(tmp_path, capsys, model_dir):
    model, cfg = model_dir
    layers = cfg["num_hidden_layers"]
    moe = layers - cfg.get("first_k_dense_replace", 0)
    profile = _write(tmp_path / "profile.json", PROFILE)
    flags = ["--cluster", "--model", model, "--profile", profile, "--attention-nodes", "1", "--expert-nodes", "2",
             "--batch", "32", "--micro-batches", "1", "--context", "8", "--json"]
    rc, out, err = _plan(flags, capsys)
    assert rc == 0 and err == ""
    data = json.loads(out)
    # flat costs: layer = 100 + 50 + 80; TPOT = MoE layers x 230 + dense layers x 100 + 1000 us
    tpot_us = moe * 230 + (layers - moe) * 100 + 1000
    assert data["tpot_ms"] == pytest.approx(tpot_us / 1000)
    assert data["tokens_per_s"] == pytest.approx(32 / tpot_us * 1e6)
    assert data["shape"] == {"attention_nodes": 1, "expert_nodes": 2, "batch": 32, "context": 8, "micro_batches": 1,
                             "shared_host": False}
    rc, text, _ = _plan(flags[:-1], capsys)
    assert rc == 0 and "tokens/s" in text and "MegaScale-Infer" in text
    # --shared-host: 2 micro-batches one after another, 2 x 230 per MoE layer, 2 x 100 per dense layer
    two = [*flags[:-4], "2", "--context", "8", "--shared-host", "--json"]
    rc, out, err = _plan(two, capsys)
    assert rc == 0 and json.loads(out)["tpot_ms"] == pytest.approx((moe * 460 + (layers - moe) * 200 + 1000) / 1000)
    rc, _, err = _plan([f for f in two if f not in ("--attention-nodes", "1")], capsys)
    assert rc != 0 and "--shared-host predicts one given shape" in err


def test_a_search_under_a_tpot_with_a_hardware_preset(capsys, model_dir):
    model, _ = model_dir
    rc, out, err = _plan(["--cluster", "--model", model, "--hardware", "h800", "--tpot-ms", "5", "--json"], capsys)
    data = json.loads(out)
    assert rc == 0 and data["tpot_ms"] <= 5 and data["tokens_per_s"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--cluster", "--hardware", "H800"], "--cluster needs --model DIR"),
    (["--cluster", "--model", "MODEL"], "needs one of --profile FILE"),
    (["--cluster", "--model", "MODEL", "--hardware", "A100"], "unknown hardware preset 'A100'"),
    (["--cluster", "--model", "MODEL", "--profile", "/nonexistent.json"], "cannot read --profile"),
    (["--cluster", "--model", "MODEL", "--hardware", "H800", "--tpot-ms", "0.000001"], "no shape in the search"),
    (["--nodes", "2"], "--loads is required"),
])
def test_bad_input_is_one_line(capsys, model_dir, flags, message):
    model, _ = model_dir
    rc, out, err = _plan([model if f == "MODEL" else f for f in flags], capsys)
    assert rc == 2 and out == "" and message in err and err.count("\n") == 1
