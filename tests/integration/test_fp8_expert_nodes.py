"""Expert nodes keeping an FP8 checkpoint's experts e4m3 (``--fp8 keep``) serve like ones that dequantize it."""

from __future__ import annotations

import pytest

from moemesh.attn_node.engine import EngineConfig
from moemesh.launch.embedded import build_local, build_remote
from moemesh.model.checkpoint import write_dequantized, write_fp8_twin
from moemesh.model.tiny import write_tiny_checkpoint
from moemesh.sampling import SamplingParams

from .mesh_procs import NodeSet, node_list

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def test_fp8_kept_nodes_generate_like_the_dequantized_checkpoint(tmp_path):
    src = write_tiny_checkpoint(tmp_path / "src", arch="deepseek_v3", hidden_size=96, layers=3, experts=8,
                                experts_per_token=2, kv_lora_rank=24)
    # (32, 32) blocks: I = 48 is off the block rows, so the kept layout pads gate and up.
    fp8 = write_fp8_twin(src, tmp_path / "fp8", block=(32, 32))
    deq = write_dequantized(fp8, tmp_path / "deq")
    prompts = [[0, 5, 9, 33], list(range(2, 19))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    local = build_local(deq, "float32", EngineConfig(), progress=False)
    want = [o.token_ids for o in local.engine.generate(prompts, params)]
    with NodeSet() as nodes:
        procs = nodes.start(fp8, ["0-4", "3-7"], ["--device", "cpu", "--fp8", "keep", "--dtype", "float32",
                                                      "--log-level", "info"])
        mesh = build_remote(fp8, node_list(procs), "float32", EngineConfig(), progress=False)
        try:
            assert [o.token_ids for o in mesh.engine.generate(prompts, params)] == want
        finally:
            mesh.close()
        loaded = [e for p in procs for e in p.log_events() if e.get("event") == "loading_experts"]
        assert [e["fp8_kept"] for e in loaded] == [True, True], loaded
