"""The engine with every Triton kernel forced on (CPU interpreter) gives the reference engine's tokens."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from moemesh.attn_node.engine import EngineConfig  # noqa: E402
from moemesh.sampling import SamplingParams  # noqa: E402
from moemesh.launch.embedded import build_local  # noqa: E402
from moemesh.model.tiny import write_tiny_checkpoint  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3", "deepseek_v32"])
def test_forced_kernels_give_the_reference_tokens(tmp_path, arch):
    path = write_tiny_checkpoint(tmp_path / arch, arch=arch, hidden_size=64, layers=2, experts=8,
                                 experts_per_token=2, kv_lora_rank=32)
    engine_cfg = EngineConfig(block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    triton = build_local(path, "float32", engine_cfg, progress=False, kernels="triton")
    reference = build_local(path, "float32", engine_cfg, progress=False, kernels="reference")
    assert triton.engine.runner.model.layers[0].attn.ops.mode == "triton"
    prompts = [[0, 5, 9, 11, 13], [0, 40, 41]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    if arch == "deepseek_v32":  # past index_topk (16): the sparse prefill, and decode through the sparse kernel
        prompts.append(list(range(2, 16)))
        assert len(prompts[-1]) < triton.cfg.index_topk < len(prompts[-1]) + params.max_tokens
    got = [o.token_ids for o in triton.engine.generate(prompts, params)]
    want = [o.token_ids for o in reference.engine.generate(prompts, params)]
    assert got == want
    torch.testing.assert_close(triton.engine.prompt_logits(prompts[0]), reference.engine.prompt_logits(prompts[0]),
                               rtol=1e-4, atol=1e-4)
