"""An FP8 (e4m3, block-scaled) checkpoint serves exactly like its dequantized twin."""

from __future__ import annotations

import pytest
import torch

from moemesh.attn_node.engine import EngineConfig
from moemesh.sampling import SamplingParams
from moemesh.model.checkpoint import write_dequantized, write_fp8_twin
from moemesh.launch.embedded import build_local
from moemesh.model.tiny import write_tiny_checkpoint

# In-process (no servers or child processes), so unit, though it lives beside the mesh tests.
pytestmark = [pytest.mark.unit, pytest.mark.slow]


@pytest.mark.parametrize("fp8_mode", ["dequant", "keep"])
def test_fp8_checkpoint_generates_like_its_dequantized_twin(tmp_path, fp8_mode):
    """Dequantized on load: the twin's weights bit for bit. Kept e4m3 (the CPU FP8 kernel, ``auto``'s choice
    where it is built): each block dequantized as it streams, the same bits out of every layer here (I = 48 is
    padded to 80 for the 40-row blocks, but 48 is a whole number of vectors: the padding adds only zeros)."""
    src = write_tiny_checkpoint(tmp_path / "src", arch="deepseek_v3", hidden_size=96, layers=3, experts=8,
                                experts_per_token=2, kv_lora_rank=24)
    # 40x40 blocks leave partial edge blocks on every 96- and 48-wide weight; shards exercise the index.
    fp8 = write_fp8_twin(src, tmp_path / "fp8", block=(40, 40), shard_max_bytes=200_000)
    deq = write_dequantized(fp8, tmp_path / "deq")
    a = build_local(fp8, "float32", EngineConfig(), progress=False, fp8=fp8_mode)
    b = build_local(deq, "float32", EngineConfig(), progress=False)
    for (name, ta), (_, tb) in zip(a.engine.runner.model.state_dict().items(),
                                   b.engine.runner.model.state_dict().items()):
        assert torch.equal(ta, tb), name
    shard_a = a.engine.backend.shard  # the MoE layers may hold it wrapped (--micro-batches auto's clock)
    shard_b = b.engine.backend.shard
    assert shard_a.hosted() == shard_b.hosted()
    assert (shard_a.fp8_block is not None) == (fp8_mode == "keep")
    for layer in shard_a.hosted():
        for e, wa in shard_a._export(layer).items():
            wa = [w.dequantize() for w in wa] if fp8_mode == "keep" else wa
            assert all(torch.equal(x, y) for x, y in zip(wa, shard_b._export(layer)[e])), (layer, e)
    prompts = [[0, 5, 9, 33], list(range(2, 19))]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in a.engine.generate(prompts, params)] == \
        [o.token_ids for o in b.engine.generate(prompts, params)]
    torch.testing.assert_close(a.engine.prompt_logits(prompts[1]), b.engine.prompt_logits(prompts[1]), rtol=0, atol=0)
