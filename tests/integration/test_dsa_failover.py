"""DeepSeek-V3.2 under an expert node's failure: a node SIGKILLed mid-generation, its rows go to replicas and
the greedy tokens are the fault-free ones (V3's case: tests/integration/test_expert_node_faults.py).

index_topk (8) is below every prompt plus its 24 new tokens, so the sparse prefill and the sparse decode
(the indexer's keys read back from the cache rows) decide these tokens, before and after the kill.
An attention node's failure on V3.2 runs in tests/integration/test_attn_failover.py (parametrized by arch).
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

ENGINE = EngineConfig(block_size=4, max_num_batched_tokens=24, max_num_seqs=8)
PROMPT_LENGTHS = (5, 13, 30)
PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
KILL_AT_STEP = 6  # prefill (24-token steps) done, every sequence decoding, most already past index_topk


def _run(engine, prompts, on_step) -> list[list[int]]:
    """Step ``engine`` to completion by hand; ``on_step(n)`` after step n."""
    rids = [engine.add_request(p, PARAMS) for p in prompts]
    tokens = {rid: [] for rid in rids}
    n = 0
    while engine.has_unfinished():
        for ev in engine.step():
            assert ev.error is None, ev.error
            tokens[ev.request_id].append(ev.token_id)
        n += 1
        on_step(n)
    return [tokens[rid] for rid in rids]


def test_v32_sigkill_of_an_expert_node_mid_generation_keeps_the_tokens(tmp_path):
    hf = save_hf_model("v32_sparse_topk8", tmp_path)
    assert max(PROMPT_LENGTHS) > hf.config.index_topk > min(PROMPT_LENGTHS)  # sparse prefill; all decode sparsely
    assert hf.config.index_topk < min(PROMPT_LENGTHS) + PARAMS.max_tokens
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, hf.config.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    local = build_local(tmp_path, "float32", ENGINE, progress=False)
    want = [o.token_ids for o in local.engine.generate(prompts, PARAMS)]
    with NodeSet() as nodes:
        # Every expert has two replicas: 0,1 on a+c; 2-5 on a+b; 6,7 on b+c.
        a, b, c = nodes.start(tmp_path, ["0-5", "2-7", "0-1,6-7"])
        mesh = build_remote(tmp_path, node_list([a, b, c]), "float32", ENGINE, progress=False,
                            dispatch_timeout_s=20)
        try:
            killed = []

            def on_step(n):
                if n == KILL_AT_STEP:
                    b.kill()
                    b.wait(timeout=10)
                    killed.append(n)

            got = _run(mesh.engine, prompts, on_step)
            assert killed == [KILL_AT_STEP], "the generation ended before the kill"
            assert mesh.remote.links[1].failure is not None
            assert [mesh.remote.links[i].failure for i in (0, 2)] == [None, None]
        finally:
            mesh.close()
    assert got == want
