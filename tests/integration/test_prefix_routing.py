"""Prefix-aware routing end to end: real etcd, a real router, two attention nodes with prefix caches.

Requests sharing a long prefix land on the node that holds it, and that node's prefix_hit_tokens
(Load, ClusterStatus) shows the prefills it skipped; distinct prompts still spread over both nodes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from moemesh.attn_node.engine import EngineConfig
from moemesh.attn_node.engine_loop import EngineLoop
from moemesh.attn_node.service import AttentionService
from moemesh.launch.embedded import build_local
from moemesh.v1 import attention_pb2, inference_pb2, inference_pb2_grpc
from tests.helpers import DEADLINE_S, eventually
from tests.integration.test_router import AttnNode, Background, collect, request, start_router

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CLUSTER = "prefix-routing"
BLOCK = 16
PREFIX_LEN = 10 * BLOCK  # 10 full blocks: far past the router's 32-token minimum match


@pytest.fixture(scope="module")
def mesh(etcd, tiny_checkpoint):
    import grpc

    path = tiny_checkpoint(arch="deepseek_v3", hidden_size=64, layers=2, experts=8, experts_per_token=2)
    bg = Background()
    nodes, loops = [], []
    for i in range(2):
        local = build_local(path, "float32", EngineConfig(block_size=BLOCK, max_num_seqs=8, max_num_batched_tokens=64,
                                                          kv_cache_tokens=8192), progress=False)
        loop = EngineLoop(local.engine, max_pending=16).start()
        loops.append(loop)
        nodes.append(AttnNode(bg, etcd.endpoint, f"attn-{i}", AttentionService(loop, local.cfg, local.tokenizer),
                              cluster=CLUSTER))
    router = start_router(bg, etcd, CLUSTER, router_id="router-prefix")
    eventually(lambda: len(router.view.ready_attention_nodes()) == 2, DEADLINE_S, "router sees both attention nodes")
    channel = grpc.insecure_channel(f"127.0.0.1:{router.port}")
    router.stub = inference_pb2_grpc.InferenceStub(channel)
    yield router, nodes, local.cfg.vocab_size
    channel.close()
    bg.run(router.stop(grace_s=1))
    for node in nodes:
        node.close()
    for loop in loops:
        loop.stop()
    bg.close()


def loads(nodes) -> dict[str, attention_pb2.LoadResponse]:
    return {n.node_id: n.stub.Load(attention_pb2.LoadRequest(), timeout=5) for n in nodes}


def prompt(vocab: int, seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % (vocab - 1) + 1 for i in range(n)]


def test_requests_sharing_a_long_prefix_land_on_the_node_that_holds_it(mesh):
    router, nodes, vocab = mesh
    prefix = prompt(vocab, 1, PREFIX_LEN)
    before = loads(nodes)
    served = [collect(router.stub, request(ids=prefix + prompt(vocab, 100 + i, 8), max_tokens=4,
                                           ignore_eos=True))[3] for i in range(4)]
    assert len(set(served)) == 1, served
    holder, other = served[0], next(n.node_id for n in nodes if n.node_id != served[0])
    after = loads(nodes)
    hits = {n: after[n].prefix_hit_tokens - before[n].prefix_hit_tokens for n in after}
    # The first request prefilled the prefix; each later one shared its 10 blocks.
    assert hits == {holder: 3 * PREFIX_LEN, other: 0}
    assert after[holder].prompt_tokens - before[holder].prompt_tokens == 4 * (PREFIX_LEN + 8)
    # ClusterStatus reads the nodes' loads through the router's short-lived cache: poll until it is current.
    def current_status():
        nodes = {n.id: n for n in router.stub.ClusterStatus(inference_pb2.ClusterStatusRequest(), timeout=10).nodes
                 if n.role == "attn"}
        hits = {n: nodes[n].prefix_hit_tokens for n in nodes}
        return nodes if hits == {n: after[n].prefix_hit_tokens for n in after} else None
    current = eventually(current_status, DEADLINE_S, "ClusterStatus shows the nodes' hit counters")
    assert current[holder].cached_blocks >= 10
    print(f"\nprefix routing: {served}; prefix_hit_tokens {dict((n, after[n].prefix_hit_tokens) for n in after)}, "
          f"prompt_tokens {dict((n, after[n].prompt_tokens) for n in after)}")


def test_concurrent_requests_sharing_a_prefix_follow_the_first(mesh):
    """Before any node has prefilled the prefix, the router remembers where it sent the first of them."""
    router, nodes, vocab = mesh
    prefix = prompt(vocab, 2, PREFIX_LEN)
    with ThreadPoolExecutor(3) as pool:
        served = list(pool.map(lambda i: collect(router.stub, request(ids=prefix + prompt(vocab, 200 + i, 8),
                                                                      max_tokens=30, ignore_eos=True))[3], range(3)))
    assert len(set(served)) == 1, served


def test_distinct_prompts_still_spread_over_both_nodes(mesh):
    router, nodes, vocab = mesh
    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(lambda i: collect(router.stub, request(ids=prompt(vocab, 300 + i, PREFIX_LEN),
                                                                      max_tokens=200, ignore_eos=True))[3], range(4)))
    assert set(served) == {"attn-0", "attn-1"}, served
