"""DeepSeek-V3.2 over two expert nodes: the mesh against transformers' V3.2 and the single process.

V3.2's MoE is V3's, so the expert nodes are unchanged; the indexer and its cache live on the attention
side. index_topk (8) is below prompt plus generation, so the sparse selection decides these tokens.
"""

from __future__ import annotations

import pytest
import torch

from moemesh.attn_node.engine import EngineConfig
from moemesh.launch.embedded import build_local, build_remote
from moemesh.sampling import SamplingParams
from tests.oracle.hf_models import save_hf_model

from .mesh_procs import NodeSet, node_list

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

NEW_TOKENS = 32
PROMPT_LENGTHS = (5, 13, 30)
ENGINE = dict(block_size=4, max_num_batched_tokens=24, max_num_seqs=8)


def test_v32_mesh_tokens_and_logits_match_transformers_and_the_single_process(tmp_path):
    hf = save_hf_model("v32_sparse_topk8", tmp_path)
    assert hf.config.index_topk < min(PROMPT_LENGTHS) + NEW_TOKENS
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, hf.config.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    local = build_local(tmp_path, "float32", EngineConfig(**ENGINE), progress=False)
    with NodeSet() as nodes:
        procs = nodes.start_many([(tmp_path, "0-3"), (tmp_path, "4-7")])
        mesh = build_remote(tmp_path, node_list(procs), "float32", EngineConfig(**ENGINE), progress=False,
                            dispatch_timeout_s=30.0)
        try:
            outs = [o.token_ids for o in mesh.engine.generate(prompts, params)]
            for prompt in prompts:
                torch.testing.assert_close(mesh.engine.prompt_logits(prompt), local.engine.prompt_logits(prompt),
                                           rtol=1e-4, atol=1e-4)
        finally:
            mesh.close()
        assert all(p.alive() for p in procs)
    for prompt, ours in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == ref, f"mesh differs from transformers' V3.2 for a {len(prompt)}-token prompt"
    assert outs == [o.token_ids for o in local.engine.generate(prompts, params)]
