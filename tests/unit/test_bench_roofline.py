"""moemesh/cli/bench_roofline.py: distinct experts counted on the device from the engine's own routing in decode
steps only, the roofline figures' arithmetic, and `moemesh bench --json` carrying them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moemesh.attn_node.engine import EngineConfig
from moemesh.cli.bench_roofline import (EngineRun, ExpertHits, attach_hits, compute_figures, matmul_gflops,
                                        roofline_figures, run_metered, stream_gbps)
from moemesh.cli.main import main
from moemesh.launch.embedded import build_local
from moemesh.model.weight_bytes import WeightBytes
from moemesh.sampling import SamplingParams

pytestmark = pytest.mark.unit


class Recorder:
    """A LoadStats stand-in keeping every call's ids (host copies: a test may read them)."""

    def __init__(self):
        self.calls: list[tuple[int, torch.Tensor]] = []

    def add(self, layer, topk_idx):
        self.calls.append((layer, topk_idx.clone()))


def test_hits_count_distinct_experts_only_while_counting_and_pass_calls_on():
    inner = Recorder()
    hits = ExpertHits((1, 2), 6, torch.device("cpu"), inner)
    hits.add(1, torch.tensor([[0, 1], [1, 5]]))  # not counting: passed on only
    hits.counting = True
    hits.add(1, torch.tensor([[0, 1], [1, 5]]))  # {0, 1, 5}
    hits.add(2, torch.tensor([[3, -1], [3, 3]]))  # {3}: -1 (computed elsewhere) is no expert, not expert 0
    later_rewritten = torch.tensor([[2, 2]])
    hits.add(1, later_rewritten)  # {2}
    later_rewritten.fill_(4)  # counted as it was when dispatched (the count runs after the run)
    assert hits.per_layer() == [4, 1] and hits.dispatches == 3
    assert len(inner.calls) == 4
    hits.reset()
    assert hits.per_layer() == [0, 0] and hits.dispatches == 0


def test_run_metered_counts_the_decode_steps_routing(tiny_checkpoint):
    model = tiny_checkpoint(arch="deepseek_v3", hidden_size=64, layers=3, experts=8, experts_per_token=2)
    mesh = build_local(model, "float32", EngineConfig(max_num_batched_tokens=512), progress=False)
    model_ = mesh.engine.runner.model
    recorder = Recorder()
    for moe in model_.moe_layers():
        moe.stats = recorder
    hits = attach_hits(model_, mesh.cfg)
    assert hits.inner is recorder  # it stands in front of the layers' statistics
    prompts = torch.randint(2, mesh.cfg.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    run = run_metered(mesh.engine, hits, prompts, params)
    assert run.tokens == [o.token_ids for o in mesh.engine.generate(prompts, params)]
    moe_layers = mesh.cfg.moe_layers
    assert run.decode_steps == 5  # one prefill step (15 tokens) samples the first token; 5 decode steps follow
    assert run.dispatches == 5 * len(moe_layers)
    # The prefill's calls carry 15 rows, the decode steps' 3 (then the generate above: not counted).
    decode_calls = [(layer, ids) for layer, ids in recorder.calls[: (1 + 5) * len(moe_layers)] if ids.shape[0] == 3]
    assert len(decode_calls) == 5 * len(moe_layers)
    expected = [sum(len(ids.unique()) for layer, ids in decode_calls if layer == m) for m in moe_layers]
    assert run.hits == expected
    assert run.decode_s > 0 and run.seconds >= run.decode_s


def test_roofline_figures_arithmetic():
    wb = WeightBytes(attention=600, norms=10, dense_mlp=200, shared_experts=100, gates=40, lm_head=50, expert=25,
                     moe_layers=2, experts_per_layer=8)  # dense 1000 per pass
    run = EngineRun(tokens=[], seconds=1.0, decode_steps=4, decode_s=0.5, hits=[20, 12], dispatches=16)
    r = roofline_figures(wb, run, gbps=1e-5, n_moe_layers=2)  # 10 kB/s
    # 16 dispatches / (4 steps x 2 layers) = 2 passes per step; (20 + 12) / 4 = 8 experts per step
    assert r["weight_bytes_per_step"] == 2 * 1000 + 8 * 25 == 2200
    assert r["experts_hit_per_layer_per_step"] == 4.0
    assert r["decode_steps_per_s"] == 8.0 and r["decode_step_ms"] == 125.0
    assert r["roofline_step_ms"] == pytest.approx(220.0)  # 2200 B at 10 kB/s
    assert r["roofline_fraction"] == pytest.approx(2200 * 8 / 1e4)


def test_compute_figures_arithmetic():
    r = compute_figures(flops=4e9, gflops=200.0, decode_step_ms=50.0)
    assert r["compute_step_ms"] == pytest.approx(20.0)  # 4 GFLOP at 200 GFLOP/s
    assert r["compute_fraction"] == pytest.approx(0.4)
    assert (r["flops_per_step"], r["matmul_gflops"]) == (4e9, 200.0)


def test_matmul_gflops_is_a_rate():
    gflops = matmul_gflops(torch.device("cpu"), torch.float32, n=64, repeats=2)
    assert math.isfinite(gflops) and gflops > 0


def test_stream_gbps_is_a_rate():
    gbps = stream_gbps(torch.device("cpu"), nbytes=1 << 20, repeats=2, reads=2)
    assert math.isfinite(gbps) and gbps > 0


@pytest.mark.slow  # transformers' import and generate
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_json_reports_the_roofline(tiny_checkpoint, capsys, dtype):
    model = tiny_checkpoint(arch="deepseek_v2", hidden_size=64, layers=2, experts=8, experts_per_token=2)
    assert main(["bench", "--model", str(model), "--batch", "2", "--prompt-len", "4", "--new-tokens", "3",
                 "--dtype", dtype, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["dtype"] == dtype  # transformers ran in it too: its tokens are compared
    assert out["tokens_match"] == 2
    assert out["decode_steps"] == 2
    assert 2 * 2 / 8 <= out["experts_hit_per_layer_per_step"] <= 2 * 2  # at least 1 of 8 for 2 rows x top-2
    assert out["weight_bytes_per_step"] > out["dense_weight_bytes_per_pass"] > 0
    assert out["stream_gbps"] > 0 and out["roofline_fraction"] > 0
    assert out["flops_per_step"] > 0 and out["matmul_gflops"] > 0 and out["compute_fraction"] > 0
