"""The torch transport (``--transport torch``, gloo on CPU) with real expert node processes.

* the same tokens as the single process, every message over the pair groups;
* a peer SIGKILLed or SIGSTOPped mid-generation: no wait beyond the dispatch timeout, tokens unchanged
  (rows go to the replica); a draining node (SIGTERM) ends its groups, exits 0, tokens unchanged;
* an expert node that ends its groups while it keeps serving gRPC: the same node's rows go over gRPC;
* an expert node without the torch transport: everything over gRPC from the start;
* a bad frame ends only its own group (INVALID_ARGUMENT, logged); the node serves new groups;
* an attention peer SIGKILLed mid-stream: the node ends that group at once and serves new ones.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from moemesh.attn_node.engine import EngineConfig
from moemesh.sampling import SamplingParams
from moemesh.attn_node.experts.hop_stats import HOPS
from moemesh.attn_node.experts.torch_link import PairFailure, TorchLink
from moemesh.model.config import ModelConfig
from moemesh.expert_node.loader import load_expert_shard
from moemesh.expert_node.server import DispatchService, dispatch_server
from moemesh.expert_node.torch_server import attach
from moemesh.launch.embedded import build_local, build_remote
from tests.oracle.hf_models import save_hf_model
from tests.helpers import eventually

from .mesh_procs import NodeSet, expert_nodes_flag, node_list

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

CONFIG = "v3_noaux_groups_bias"  # MoE layers 1 and 2, 8 experts, K = 2, hidden 64
ENGINE = EngineConfig(block_size=4, max_num_batched_tokens=24, max_num_seqs=8)
NEW_TOKENS = 16
PARAMS = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
TORCH = ["--transport", "torch"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp(CONFIG)
    save_hf_model(CONFIG, path)
    return path


@pytest.fixture(scope="module")
def prompts(model_dir):
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in (5, 13, 30)]


@pytest.fixture(scope="module")
def reference_tokens(model_dir, prompts):
    local = build_local(model_dir, "float32", ENGINE, progress=False)
    return [o.token_ids for o in local.engine.generate(prompts, PARAMS)]


@pytest.fixture
def nodes():
    with NodeSet() as ns:
        yield ns


def run_engine(engine, prompts, on_step=None) -> list[list[int]]:
    rids = [engine.add_request(p, PARAMS) for p in prompts]
    tokens = {rid: [] for rid in rids}
    n = 0
    while engine.has_unfinished():
        for ev in engine.step():
            assert ev.finish_reason != "error", ev.error
            tokens[ev.request_id].append(ev.token_id)
        n += 1
        if on_step is not None:
            on_step(n)
    return [tokens[rid] for rid in rids]


def torch_mesh(model_dir, procs, timeout_s=20.0, ready=True):
    mesh = build_remote(model_dir, node_list(procs), "float32", ENGINE, progress=False, dispatch_timeout_s=timeout_s,
                        transport="torch")
    if ready:
        assert all(link.wait_ready(30) for link in mesh.remote.links), [l.pair.failure for l in mesh.remote.links]
    return mesh


def test_tokens_over_torch_equal_the_single_process(nodes, model_dir, prompts, reference_tokens):
    procs = nodes.start(model_dir, ["0-3", "4-7"], TORCH)
    with grpc.insecure_channel(procs[0].address) as channel:  # reflection lists the torch service too
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert "moemesh.v1.TorchTransport" in services and "moemesh.v1.ExpertDispatch" in services, services
    mesh = torch_mesh(model_dir, procs)
    try:
        assert run_engine(mesh.engine, prompts) == reference_tokens
        hops = {h.address: h for h in HOPS.summaries()}
        for link in mesh.remote.links:
            assert link.transport == "torch" and link.pair.messages > 0 and link.fallback_messages == 0
            assert link.grpc.failure is None
            h = hops[link.address]  # timed over the pair group, with the node's own compute in the reply frame
            assert h.samples >= link.pair.messages and 0 < h.compute_p50_us < h.hop_p50_us, h
    finally:
        mesh.close()
    for proc in procs:  # the bye ends each group on the node's side
        downs = eventually(lambda: _events(proc, "torch_session_down"), what=f"torch_session_down on {proc.spec}")
        assert downs[-1]["error"] is None and downs[-1]["messages"] > 0, proc.stderr_tail()


def test_sigkill_mid_generation_with_replicas(nodes, model_dir, prompts, reference_tokens):
    # Every expert has two replicas: 0,1 on a+c; 2-5 on a+b; 6,7 on b+c.
    a, b, c = nodes.start(model_dir, ["0-5", "2-7", "0-1,6-7"], TORCH)
    timeout_s = 20.0
    mesh = torch_mesh(model_dir, [a, b, c], timeout_s)
    try:
        killed = {}

        def on_step(n):
            if n == 4:  # prefill done for some, decoding for others
                b.kill()
                b.wait(timeout=10)
                killed["at"] = time.monotonic()
            elif n == 5:  # the step that met the dead node: timed from the kill, not over the whole run
                killed["failover_s"] = time.monotonic() - killed["at"]

        assert run_engine(mesh.engine, prompts, on_step) == reference_tokens
        assert killed["failover_s"] < timeout_s, "a dead peer is noticed at once, not at the deadline"
        links = mesh.remote.links
        assert links[1].failure is not None and links[1].pair.failure is not None
        assert [link.transport for link in (links[0], links[2])] == ["torch", "torch"]
    finally:
        mesh.close()


def test_stopped_peer_times_out_and_the_replica_takes_its_rows(nodes, model_dir, prompts, reference_tokens):
    a, b = nodes.start(model_dir, ["all", "all"], TORCH)
    timeout_s = 2.0
    mesh = torch_mesh(model_dir, [a, b], timeout_s)
    try:
        stopped = {}

        def on_step(n):
            if n == 3:
                stopped["at"] = time.monotonic()
                b.stop()

        assert run_engine(mesh.engine, prompts, on_step) == reference_tokens
        total = time.monotonic() - stopped["at"]  # from the SIGSTOP to the end, not over the whole run
        assert mesh.remote.links[1].failure is not None and mesh.remote.links[0].transport == "torch"
        assert total < 3 * timeout_s + 15, f"{total:.1f}s: one deadline, not one per layer or step"
        assert b.alive()
    finally:
        mesh.close()  # before SIGCONT + SIGKILL in the nodes fixture


def test_sigterm_drains_groups_and_exits_zero(nodes, model_dir, prompts, reference_tokens):
    a, b = nodes.start(model_dir, ["all", "all"], TORCH)
    mesh = torch_mesh(model_dir, [a, b])
    try:
        def on_step(n):
            if n == 3:
                b.terminate()

        assert run_engine(mesh.engine, prompts, on_step) == reference_tokens
        assert b.wait(timeout=30) == 0, b.stderr_tail()
        assert mesh.remote.links[1].pair.failure is not None
    finally:
        mesh.close()


class _InProcessExpert:
    """An expert node's servers on an event-loop thread here, so the test can reach its torch service."""

    def __init__(self, model_dir):
        cfg = ModelConfig.from_dir(model_dir)
        self.dispatch = DispatchService(load_expert_shard(str(model_dir), cfg, None, progress=False), cfg)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server, self.port, self.torch = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()

    async def _start(self):
        server, port, health = dispatch_server(self.dispatch)
        torch_service = attach(server, lambda: self.dispatch, "127.0.0.1")
        await server.start()
        await health.set("", 1)  # SERVING
        return server, port, torch_service

    def end_groups(self):
        """Drain the torch service only: its groups end, ExpertDispatch keeps serving."""
        self.loop.call_soon_threadsafe(self.torch.drain)

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_groups_ended_by_a_live_node_fall_back_to_grpc_on_that_node(model_dir, prompts, reference_tokens):
    expert = _InProcessExpert(model_dir)
    mesh = build_remote(model_dir, [(f"127.0.0.1:{expert.port}", "all")], "float32", ENGINE, progress=False,
                        dispatch_timeout_s=20, transport="torch")
    try:
        (link,) = mesh.remote.links
        assert link.wait_ready(30)

        def on_step(n):
            if n == 3:
                expert.end_groups()

        t0 = time.monotonic()
        assert run_engine(mesh.engine, prompts, on_step) == reference_tokens
        assert time.monotonic() - t0 < 20
        assert link.pair.failure is not None and link.failure is None and link.transport == "grpc"
        assert link.pair.messages > 0 and link.fallback_messages > 0
    finally:
        mesh.close()
        expert.stop()


def test_node_without_torch_transport_serves_over_grpc(nodes, model_dir, prompts, reference_tokens):
    procs = nodes.start(model_dir, ["0-3", "4-7"])  # --transport grpc (the default)
    mesh = torch_mesh(model_dir, procs, ready=False)
    try:
        for link in mesh.remote.links:
            assert not link.wait_ready(30)
            assert "UNIMPLEMENTED" in link.pair.failure
        assert run_engine(mesh.engine, prompts) == reference_tokens
        assert all(link.transport == "grpc" and link.failure is None for link in mesh.remote.links)
    finally:
        mesh.close()


def test_bad_frame_ends_only_its_own_group(nodes, model_dir):
    (node,) = nodes.start(model_dir, ["0-3"], TORCH)
    cfg = ModelConfig.from_dir(model_dir)
    x, w = torch.randn(2, cfg.hidden_size), torch.full((2, 2), 0.5)
    bad = TorchLink(node.address, hidden_size=cfg.hidden_size, timeout_s=10)
    good = TorchLink(node.address, hidden_size=cfg.hidden_size, timeout_s=10)
    try:
        assert bad.wait_ready(30) and good.wait_ready(30)
        bad.pair.on_lost = None  # see the failure itself, not its gRPC retry
        with pytest.raises(PairFailure):
            bad.send(1, x, torch.tensor([[0, 7], [1, 2]]), w, 0).result(30)  # expert 7 lives elsewhere
        events = eventually(lambda: _events(node, "bad_torch_frame"), what="the node logs bad_torch_frame")
        assert "not hosted" in events[0]["error"], node.stderr_tail()
        y = good.send(1, x, torch.tensor([[0, 3], [1, 2]]), w, 0).result(30)
        shard = load_expert_shard(str(model_dir), cfg, {1: [0, 1, 2, 3]}, progress=False)
        torch.testing.assert_close(y, shard.forward(1, x, torch.tensor([[0, 3], [1, 2]]), w), rtol=1e-5, atol=1e-5)
        assert good.transport == "torch" and node.alive()
    finally:
        bad.close()
        good.close()


ATTN_PEER = """
import sys, torch
from moemesh.attn_node.experts.torch_link import TorchLink
link = TorchLink(sys.argv[1], hidden_size=int(sys.argv[2]), timeout_s=30)
assert link.wait_ready(30), link.pair.failure
x, idx, w = torch.randn(4, int(sys.argv[2])), torch.zeros(4, 2, dtype=torch.int64), torch.full((4, 2), 0.5)
link.send(1, x, idx, w, 0).result(30)
print("up", flush=True)  # the group is up and a frame went through it
while True:
    link.send(1, x, idx, w, 0).result(30)
"""


def test_attention_peer_killed_mid_stream_ends_only_its_group(nodes, model_dir):
    import subprocess
    import sys

    (node,) = nodes.start(model_dir, ["0-3"], TORCH)
    hidden = ModelConfig.from_dir(model_dir).hidden_size
    peer = subprocess.Popen([sys.executable, "-c", ATTN_PEER, node.address, str(hidden)], stdout=subprocess.PIPE,
                            text=True)
    try:
        for line in peer.stdout:  # (structlog prints to stdout in an unconfigured process)
            if line.strip() == "up":
                break
        assert peer.poll() is None, "the peer died before its group was up"
        peer.kill()  # frames flowing: the peer said "up" after its first reply
        peer.wait(10)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10 and not any(e.get("event") == "torch_session_closed"
                                                     for e in node.log_events()):
            time.sleep(0.05)
        closed = [e for e in node.log_events() if e.get("event") == "torch_session_closed"]
        assert closed and closed[0]["messages"] > 0, node.stderr_tail()
        assert time.monotonic() - t0 < 10, "the node noticed the dead peer at once, not after the idle timeout"
        link = TorchLink(node.address, hidden_size=hidden, timeout_s=10)
        try:
            assert link.wait_ready(30)
            link.send(1, torch.randn(2, hidden), torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5), 0).result(30)
            assert link.transport == "torch"
        finally:
            link.close()
    finally:
        if peer.poll() is None:
            peer.kill()


def test_generate_cli_over_torch_prints_the_reference_tokens(nodes, model_dir, prompts, reference_tokens):
    procs = nodes.start(model_dir, ["0-3", "4-7"], TORCH)
    args = [sys.executable, "-m", "moemesh.cli", "generate", "--model", str(model_dir), "--max-tokens",
            str(NEW_TOKENS), "--temperature", "0", "--ignore-eos", "--json", "--transport", "torch",
            "--expert-nodes", expert_nodes_flag(procs)]
    for prompt in prompts:
        args += ["--prompt-ids", ",".join(map(str, prompt))]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line)["token_ids"] for line in proc.stdout.splitlines() if line.strip()] == reference_tokens
    for node in procs:  # the rows went over the torch groups; the bye ends each group on the node's side
        downs = eventually(lambda: _events(node, "torch_session_down"), what=f"torch_session_down on {node.spec}")
        assert downs[-1]["messages"] > 0, node.stderr_tail()


def _events(proc, name: str) -> list[dict]:
    return [e for e in proc.log_events() if e.get("event") == name]
