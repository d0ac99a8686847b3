"""`moemesh bench --shared-prefix N --json`: cold and warm TTFT, the warm run's cache hits, tokens equal to the cache off."""

from __future__ import annotations

import json

from moemesh.cli.main import main


def test_bench_shared_prefix_json(tiny_checkpoint, capsys):
    model = tiny_checkpoint(arch="deepseek_v2", hidden_size=64, layers=2, experts=8, experts_per_token=2)
    assert main(["bench", "--shared-prefix", "40", "--model", str(model), "--batch", "3", "--prompt-len", "5",
                 "--new-tokens", "3", "--block-size", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ttft_cold_ms"] > 0 and out["ttft_warm_ms"] > 0
    # Each warm prompt (45 tokens) shares the prefix's 5 full blocks of 8.
    assert out["prefix_hit_tokens"] == 3 * 40
    assert out["warm_prompt_tokens"] == 3 * 45
    assert out["prefix_tokens_match"] is True
    assert (out["shared_prefix"], out["block_size"]) == (40, 8)
