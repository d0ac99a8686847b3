"""The mesh (attention engine here, routed experts on real expert-node processes) against the
single process and against Hugging Face transformers, on checkpoints transformers wrote itself.

Three placements over three configs: experts split evenly, split unevenly (per-layer items),
and replicated (rows of a replicated expert alternate between its replicas). For a mixed-length
batch, greedy tokens must be identical on all three sides; ping-pong micro-batches must not change
a token; prompt logits must agree with the single process to fp32 tolerance.
"""

from __future__ import annotations

import pytest
import torch
from prometheus_client import REGISTRY

from moemesh.attn_node.engine import EngineConfig
from moemesh.attn_node.experts.hop_stats import HOPS
from moemesh.attn_node.experts.remote_backend import rows_with_work
from moemesh.sampling import SamplingParams
from moemesh.launch.embedded import build_local, build_remote
from tests.oracle.hf_models import save_hf_model

from .mesh_procs import NodeSet, node_list

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

NEW_TOKENS = 24
PROMPT_LENGTHS = (5, 13, 30)
# Small blocks and step budget: block tables and chunked prefill are exercised on the mesh too.
ENGINE = dict(block_size=4, max_num_batched_tokens=24, max_num_seqs=8)

# case -> (config, expert specs of its nodes). MoE layers: v2_group_limited_lora 2,3; the v3 ones 1,2.
CASES = {
    "even": ("v2_group_limited_lora", ["0-3", "4-7"]),
    "uneven": ("v3_noaux_groups_bias", ["1:0-6,2:0-1", "1:7,2:2-5", "2:6-7"]),
    "replicas": ("v3_yarn_nolora", ["0-5", "2-7", "all"]),
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Every case's checkpoint (and transformers model), and every case's nodes, started all at once."""
    models, dirs = {}, {}
    for case, (config, _) in CASES.items():
        dirs[case] = tmp_path_factory.mktemp(config)
        models[case] = save_hf_model(config, dirs[case])
    with NodeSet() as nodes:
        order = [(case, spec) for case, (_, specs) in CASES.items() for spec in specs]
        procs = nodes.start_many([(dirs[case], spec) for case, spec in order])
        by_case: dict[str, list] = {case: [] for case in CASES}
        for (case, _), proc in zip(order, procs):
            by_case[case].append(proc)
        yield {case: (dirs[case], models[case], by_case[case]) for case in CASES}


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, cluster):
    path, hf, procs = cluster[request.param]
    local = build_local(path, "float32", EngineConfig(**ENGINE), progress=False)
    meshes = {
        mb: build_remote(path, node_list(procs), "float32", EngineConfig(**ENGINE, micro_batches=mb),
                         progress=False, dispatch_timeout_s=30.0)
        for mb in (1, 2)
    }
    rows_sent = {mb: _count_rows(mesh) for mb, mesh in meshes.items()}
    prompts = _prompts(local.cfg.vocab_size)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    tokens = {"local": [o.token_ids for o in local.engine.generate(prompts, params)]}
    for mb, mesh in meshes.items():
        tokens[f"mesh{mb}"] = [o.token_ids for o in mesh.engine.generate(prompts, params)]
    try:
        yield dict(name=request.param, hf=hf, local=local, meshes=meshes, prompts=prompts, tokens=tokens,
                   procs=procs, rows_sent=rows_sent)
    finally:
        for mesh in meshes.values():
            mesh.close()


def test_mesh_tokens_match_single_process_and_transformers(case):
    tokens = case["tokens"]
    for prompt, ours in zip(case["prompts"], tokens["mesh1"]):
        assert len(ours) == NEW_TOKENS
        with torch.no_grad():
            ref = case["hf"].generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == ref, f"{case['name']}: mesh differs from transformers for a {len(prompt)}-token prompt"
    assert tokens["mesh1"] == tokens["local"]


def test_micro_batch_overlap_gives_the_same_tokens(case):
    assert case["tokens"]["mesh2"] == case["tokens"]["mesh1"]


def test_prompt_logits_match_single_process(case):
    for prompt in case["prompts"]:
        ref = case["local"].engine.prompt_logits(prompt)
        for mb, mesh in case["meshes"].items():
            ours = mesh.engine.prompt_logits(prompt)
            assert ours.shape == ref.shape == (len(prompt), case["local"].cfg.vocab_size)
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"micro_batches={mb}: {m}")


def test_every_node_served_rows(case):
    """Each node, replicas included, got work during generation: the placement really spread the experts."""
    for mb, counts in case["rows_sent"].items():
        assert all(n > 0 for n in counts), f"micro_batches={mb}: rows per node {counts}"
    for proc in case["procs"]:
        assert proc.alive(), proc.stderr_tail()


def test_every_node_hop_is_timed_with_its_own_compute(case):
    """Each node's hops are in this process's window, split by the node's own timings (DispatchResponse 30-32)."""
    hops = {h.address: h for h in HOPS.summaries()}
    for proc in case["procs"]:
        h = hops.get(proc.address)
        assert h is not None and h.samples > 0, f"no hops timed to {proc.address}: {sorted(hops)}"
        assert 0 < h.compute_p50_us < h.hop_p50_us <= h.hop_p99_us, h
        count = REGISTRY.get_sample_value("moemesh_dispatch_compute_seconds_count", {"node": proc.address})
        assert count and count >= h.samples, (count, h)


def _count_rows(mesh) -> list[int]:
    """Wrap each node link's ``send`` to count the rows that cross to it; returns the live counters.

    The backend hands every node all T rows (those with work first) with ``trim``: only those with work cross."""
    counts = [0] * len(mesh.remote.links)
    for i, link in enumerate(mesh.remote.links):
        def counting(layer, x, idx, w, version, trim=False, _send=link.send, _i=i):
            counts[_i] += rows_with_work(idx.numpy()) if trim else x.shape[0]
            return _send(layer, x, idx, w, version, trim)

        link.send = counting
    return counts
