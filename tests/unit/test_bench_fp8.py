"""`moemesh bench` on an FP8 checkpoint: transformers (whose FP8 path needs a GPU) runs the checkpoint's
dequantized twin, moemesh keeps the routed experts e4m3 (the CPU FP8 kernel), and the tokens agree."""

from __future__ import annotations

import json

import pytest

from moemesh.cli.main import main
from moemesh.model.checkpoint import write_fp8_twin

pytestmark = pytest.mark.unit


@pytest.mark.slow  # transformers' import and generate
def test_bench_runs_an_fp8_checkpoint_against_its_dequantized_twin(tiny_checkpoint, tmp_path, capsys):
    src = tiny_checkpoint(arch="deepseek_v3", hidden_size=64, layers=2, experts=8, experts_per_token=2)
    fp8 = write_fp8_twin(src, tmp_path / "fp8", block=(32, 32))
    assert main(["bench", "--model", str(fp8), "--fp8", "keep", "--batch", "2", "--prompt-len", "4",
                 "--new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens_match"] == 2
    assert out["weight_bytes_per_step"] > 0
