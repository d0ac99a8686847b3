"""DeepSeek-V3.2's sparse attention matters in these checks: a dense run of the same weights differs.

tests/oracle/test_transformers_parity.py runs the V3.2 configs of hf_models.py like every other (prefill
logits in fp32, 32 greedy tokens batched, logprobs) with index_topk below prompt plus generation. Here: the
same weights with index_topk past every context (dense MLA, transformers' own model) give other logits, and
moemesh's agree with the sparse model's, not the dense one's: the indexer's selection is what is matched.
"""

from __future__ import annotations

import pytest
import torch

from moemesh.attn_node.engine import EngineConfig
from moemesh.launch.embedded import build_local

from .hf_models import CONFIGS, build_hf_model, save_hf_model

pytestmark = pytest.mark.oracle

V32 = sorted(name for name, (arch, _) in CONFIGS.items() if arch == "v32")


@pytest.mark.parametrize("name", V32)
def test_sparse_logits_match_and_a_dense_run_differs(name, tmp_path):
    sparse = save_hf_model(name, tmp_path)
    dense = build_hf_model(name, index_topk=1 << 20)  # same seed, same weights: only the top-k differs
    topk = sparse.config.index_topk
    mesh = build_local(tmp_path, "float32", EngineConfig(block_size=4, max_num_batched_tokens=24, max_num_seqs=8), progress=False)
    prompt = torch.randint(2, sparse.config.vocab_size, (3 * topk,), generator=torch.Generator().manual_seed(2))
    ours = mesh.engine.prompt_logits(prompt.tolist())
    with torch.no_grad():
        ref, ref_dense = (m(prompt[None]).logits[0].float() for m in (sparse, dense))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # Up to topk positions every query sees its whole context: sparse is dense there, exactly as it should be.
    torch.testing.assert_close(ours[:topk], ref_dense[:topk], rtol=1e-4, atol=1e-4)
    assert (ours[topk:] - ref_dense[topk:]).abs().max() > 1e-2
