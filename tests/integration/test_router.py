"""The router end to end on loopback: real etcd, real in-process attention nodes on a tiny model.

The attention nodes' records are written here through a Registry (standing in for the nodes' own
registration). Each scenario that elects or places uses its own cluster name, so they stay apart.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.attn_node.engine import EngineConfig
from moemesh.attn_node.engine_loop import EngineLoop
from moemesh.attn_node.service import AttentionService, attention_server
from moemesh.control.etcd import Registry
from moemesh.launch.etcd_server import free_port
from moemesh.launch.embedded import build_local
from moemesh.router.server import Router
from moemesh.router.cluster import PlacementPolicy
from moemesh.v1 import attention_pb2, attention_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.helpers import DEADLINE_S, eventually, node_record  # noqa: F401 (eventually: test_router_control)
from tests.tls_certs import mesh_certs, role_tls

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CLUSTER = "routing"
TTL = 5.0  # no test here waits for a lease to expire (closing a registry revokes its lease)
Code = grpc.StatusCode


class Background:
    """One event loop on a thread for every async server and registry; the test drives it synchronously."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout_s: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class AttnNode:
    """An AttentionService on 127.0.0.1 plus its record in etcd (role attn, status ready)."""

    def __init__(self, bg: Background, etcd: str, node_id: str, servicer, cluster: str = CLUSTER):
        self.bg, self.node_id = bg, node_id
        self.server, self.port = bg.run(self._serve(servicer))
        self.address = f"127.0.0.1:{self.port}"
        self.registry = bg.run(self._register(etcd, cluster))
        self.channel = grpc.insecure_channel(self.address)
        self.stub = attention_pb2_grpc.AttentionNodeStub(self.channel)

    async def _serve(self, servicer):
        server, port, _ = attention_server(servicer)
        await server.start()
        return server, port

    async def _register(self, etcd, cluster):
        reg = await Registry.connect(etcd, cluster, ttl_s=TTL)
        await reg.register(node_record("attn", self.node_id, {"address": self.address, "status": "ready"}))
        return reg

    def stop_server(self):
        self.bg.run(self.server.stop(None))

    def close(self):
        self.channel.close()
        self.bg.run(self.server.stop(None))
        self.bg.run(self.registry.close())


class FakeNode(attention_pb2_grpc.AttentionNodeServicer):
    """Looks idle with a huge free cache (so it is picked first) but refuses every Generate with ``code``."""

    def __init__(self, code: Code):
        self.code, self.generate_calls = code, 0

    async def Load(self, request, context):
        return attention_pb2.LoadResponse(running=0, waiting=0, cache_free_tokens=10**9, cache_total_tokens=10**9)

    async def Generate(self, request, context):
        self.generate_calls += 1
        await context.abort(self.code, "fake node refuses")
        yield  # pragma: no cover

    async def ModelInfo(self, request, context):
        await context.abort(Code.UNAVAILABLE, "fake node")


class DyingNode(attention_pb2_grpc.AttentionNodeServicer):
    """Looks idlest (so it is picked first), streams the first ``k`` responses of ``script``, then fails.

    ``fail`` is a status code to abort with, or None to end the stream without a finish_reason;
    ``before_failing`` (async) runs just before, e.g. to mark the node draining.
    """

    def __init__(self, script, k: int, fail: Code | None, before_failing=None):
        self.script, self.k, self.fail, self.before_failing = script, k, fail, before_failing
        self.requests = []

    async def Load(self, request, context):
        return attention_pb2.LoadResponse(running=0, waiting=0, cache_free_tokens=10**9, cache_total_tokens=10**9)

    async def Generate(self, request, context):
        self.requests.append(request)
        for response in self.script[: self.k]:
            out = inference_pb2.GenerateResponse()
            out.CopyFrom(response)
            out.request_id = request.request_id
            yield out
        if self.before_failing is not None:
            await self.before_failing()
        if self.fail is not None:
            await context.abort(self.fail, "dying node fails")

    async def ModelInfo(self, request, context):
        await context.abort(Code.UNAVAILABLE, "dying node: ask another")


@pytest.fixture(scope="module")
def bg():
    b = Background()
    yield b
    b.close()


@pytest.fixture(scope="module")
def nodes(bg, etcd, tiny_checkpoint):
    path = tiny_checkpoint(arch="deepseek_v3", hidden_size=64, layers=2,
                                 experts=8, experts_per_token=2)
    out, loops = [], []
    for i in range(2):
        mesh = build_local(path, "float32", EngineConfig(max_num_seqs=8, max_num_batched_tokens=64,
                                                         kv_cache_tokens=8192), progress=False)
        loop = EngineLoop(mesh.engine, max_pending=16).start()
        loops.append(loop)
        out.append(AttnNode(bg, etcd.endpoint, f"attn-{i}", AttentionService(loop, mesh.cfg, mesh.tokenizer)))
    out[0].tokenizer = mesh.tokenizer
    yield out
    for node in out:
        node.close()
    for loop in loops:
        loop.stop()


def start_router(bg, etcd, cluster=CLUSTER, **kw) -> Router:
    kw.setdefault("ttl_s", TTL)
    kw.setdefault("policy", PlacementPolicy(settle_s=0.2))
    router = Router(etcd.endpoint, cluster, **kw)
    bg.run(router.start())
    bg.run(router.connected(10))
    return router


@pytest.fixture(scope="module")
def router(bg, etcd, nodes):
    r = start_router(bg, etcd, router_id="router-main")
    eventually(lambda: len(r.view.ready_attention_nodes()) == 2, DEADLINE_S, "router sees both attention nodes")
    channel = grpc.insecure_channel(f"127.0.0.1:{r.port}")
    r.stub = inference_pb2_grpc.InferenceStub(channel)
    yield r
    channel.close()
    bg.run(r.stop(grace_s=1))


def request(ids=None, text=None, **sampling):
    sampling.setdefault("max_tokens", 8)
    req = inference_pb2.GenerateRequest(sampling=inference_pb2.SamplingParams(**sampling))
    if ids is not None:
        req.token_ids.ids.extend(ids)
    if text is not None:
        req.text = text
    return req


def collect(stub, req, metadata=None):
    """(tokens, text, last response, node id from the router's initial metadata)."""
    call = stub.Generate(req, timeout=30, metadata=metadata)
    tokens, text, last = [], "", None
    for resp in call:
        tokens.extend(resp.token_ids)
        text += resp.text
        last = resp
    node = dict(call.initial_metadata() or ()).get("x-moemesh-node")
    return tokens, text, last, node


def _router_metric(name: str, **labels) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {"role": "router", **labels}) or 0.0


def test_generate_streams_what_the_node_streams(router, nodes):
    finished = _router_metric("moemesh_requests_total", outcome="length")
    for prompt in ([0, 5, 9, 11], [0, 40, 41, 42, 43]):
        direct = collect(nodes[0].stub, request(ids=prompt, max_tokens=10, ignore_eos=True))
        tokens, text, last, node = collect(router.stub, request(ids=prompt, max_tokens=10, ignore_eos=True))
        assert (tokens, text) == direct[:2] and len(tokens) == 10
        assert last.finish_reason == "length"
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt), 10)
        assert node == "attn-0"  # both idle: the tie goes to the lower id
    assert _router_metric("moemesh_requests_total", outcome="length") == finished + 2
    assert _router_metric("moemesh_time_to_first_token_seconds_count") >= 2


def test_text_prompt_and_request_id(router, nodes):
    req = request(text="The river", max_tokens=6, ignore_eos=True)
    req.request_id = "client-req-1"
    tokens, text, last, _ = collect(router.stub, req)
    assert tokens == collect(nodes[1].stub, request(text="The river", max_tokens=6, ignore_eos=True))[0]
    assert text == nodes[0].tokenizer.decode(tokens)
    assert last.request_id == "client-req-1"
    assert collect(router.stub, request(text="The river", max_tokens=2))[2].request_id  # one is made up


def test_request_goes_to_the_less_loaded_node(router, nodes):
    busy = nodes[0].stub.Generate(request(ids=[0, 5], max_tokens=1900, ignore_eos=True), timeout=60)
    try:
        next(busy)
        eventually(lambda: nodes[0].stub.Load(attention_pb2.LoadRequest(), timeout=5).running == 1, DEADLINE_S,
                   "attn-0 runs the long request")
        time.sleep(router.pool.load_max_age_s + 0.05)  # past the router's cached loads
        assert collect(router.stub, request(ids=[0, 7], max_tokens=3))[3] == "attn-1"
    finally:
        busy.cancel()
    eventually(lambda: nodes[0].stub.Load(attention_pb2.LoadRequest(), timeout=5).running == 0, DEADLINE_S, "attn-0 idle")


def test_concurrent_requests_spread_over_both_nodes(router, nodes):
    from concurrent.futures import ThreadPoolExecutor

    time.sleep(router.pool.load_max_age_s + 0.05)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: collect(router.stub, request(ids=[0, 3 + i], max_tokens=200,
                                                                   ignore_eos=True)), range(4)))
    assert {g[3] for g in got} == {"attn-0", "attn-1"}


@pytest.mark.parametrize("code", [Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED])
def test_failover_before_the_first_token(bg, etcd, router, nodes, code):
    fake = FakeNode(code)
    flaky = AttnNode(bg, etcd.endpoint, "attn-00-flaky", fake)
    dead_reg = bg.run(Registry.connect(etcd.endpoint, CLUSTER, ttl_s=TTL))  # a ready record, nothing listening
    bg.run(dead_reg.register(node_record("attn", "attn-000-dead", {"address": f"127.0.0.1:{free_port()}", "status": "ready"})))
    try:
        eventually(lambda: len(router.view.ready_attention_nodes()) == 4, DEADLINE_S, "router sees the extra records")
        want = collect(nodes[0].stub, request(ids=[0, 5, 9], max_tokens=6, ignore_eos=True))[0]
        tokens, _, last, node = collect(router.stub, request(ids=[0, 5, 9], max_tokens=6, ignore_eos=True))
        assert fake.generate_calls == 1  # tried first (it looked idlest), refused, skipped
        assert node in ("attn-0", "attn-1") and tokens == want and last.finish_reason == "length"
        assert router.stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=5).vocab_size > 0
    finally:
        flaky.close()
        bg.run(dead_reg.close())
    eventually(lambda: len(router.view.ready_attention_nodes()) == 2, DEADLINE_S, "extra records gone")


def collect_all(stub, req):
    """(responses, initial metadata, trailing metadata) of one Generate through ``stub``."""
    call = stub.Generate(req, timeout=30)
    responses = list(call)
    return responses, dict(call.initial_metadata() or ()), dict(call.trailing_metadata() or ())


def _tokens(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


@pytest.mark.parametrize("fail, reason, stop", [
    (Code.UNAVAILABLE, "unavailable", False),  # the node's process died or its connection broke
    (Code.UNAVAILABLE, "unavailable", True),  # ... with a stop string whose prefix the dead node held back
    (None, "stream_ended", False),  # it closed the stream without finishing it
    (Code.CANCELLED, "draining", False),  # a draining node's grace ran out
])
def test_node_failing_mid_stream_is_resumed_on_another_without_gap_or_duplicate(bg, etcd, router, nodes, fail,
                                                                                  reason, stop):
    req = request(text="The river", max_tokens=14, ignore_eos=True)
    if stop:
        plain = "".join(r.text for r in nodes[0].stub.Generate(req, timeout=30))
        req.sampling.stop.append(plain[6:9])
    want = list(nodes[0].stub.Generate(req, timeout=30))  # fault-free, straight from a node
    assert len(want) > 5, want

    async def mark_draining():
        await dying.registry.update(status="draining")
        for _ in range(250):
            record = router.view.node("attn", "attn-00-dying")
            if record is not None and record.status == "draining":
                return
            await asyncio.sleep(0.02)

    fake = DyingNode(want, 4, fail, mark_draining if fail == Code.CANCELLED else None)
    dying = AttnNode(bg, etcd.endpoint, "attn-00-dying", fake)
    resumes = _router_metric("moemesh_generate_resumes_total", reason=reason)
    try:
        eventually(lambda: len(router.view.ready_attention_nodes()) == 3, DEADLINE_S, "router sees the dying node")
        got, initial, trailing = collect_all(router.stub, req)
    finally:
        dying.close()
    assert len(fake.requests) == 1 and not fake.requests[0].resume_token_ids
    assert _tokens(got) == _tokens(want)  # nothing missing, nothing twice
    assert "".join(r.text for r in got) == "".join(r.text for r in want)
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
    assert (got[-1].usage.prompt_tokens, got[-1].usage.completion_tokens) == (
        want[-1].usage.prompt_tokens, want[-1].usage.completion_tokens)
    assert initial["x-moemesh-node"] == "attn-00-dying"
    first, second = trailing["x-moemesh-nodes"].split(",")
    assert first == "attn-00-dying" and second in ("attn-0", "attn-1") and trailing["x-moemesh-resumes"] == "1"
    assert _router_metric("moemesh_generate_resumes_total", reason=reason) == resumes + 1
    eventually(lambda: len(router.view.ready_attention_nodes()) == 2, DEADLINE_S, "dying node's record gone")


def test_logprobs_pass_through_the_router_and_a_resume(bg, etcd, router, nodes):
    req = request(ids=[0, 5, 9], max_tokens=10, ignore_eos=True, logprobs=2)
    want = list(nodes[0].stub.Generate(req, timeout=30))
    assert [len(r.logprobs) for r in want] == [1] * len(want) and len(want[0].logprobs[0].top) == 2
    direct, _, _ = collect_all(router.stub, req)  # through the router, nothing dropped
    assert [[(lp.token_id, len(lp.top)) for lp in r.logprobs] for r in direct] == [
        [(lp.token_id, len(lp.top)) for lp in r.logprobs] for r in want]
    dying = AttnNode(bg, etcd.endpoint, "attn-00-dying", DyingNode(want, 4, Code.UNAVAILABLE))
    try:
        eventually(lambda: len(router.view.ready_attention_nodes()) == 3, DEADLINE_S, "router sees the dying node")
        got, _, trailing = collect_all(router.stub, req)
    finally:
        dying.close()
    assert trailing["x-moemesh-resumes"] == "1"
    assert _tokens(got) == _tokens(want)
    # After the resume the next node still computes them: one per token, each with its 2 alternatives.
    assert [[lp.token_id for lp in r.logprobs] for r in got] == [list(r.token_ids) for r in got]
    assert all(len(lp.top) == 2 for r in got for lp in r.logprobs)
    for a, b in zip((lp for r in got for lp in r.logprobs), (lp for r in want for lp in r.logprobs)):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    eventually(lambda: len(router.view.ready_attention_nodes()) == 2, DEADLINE_S, "dying node's record gone")


@pytest.mark.parametrize("fail", [Code.INTERNAL, Code.CANCELLED, Code.INVALID_ARGUMENT])
def test_mid_stream_errors_that_are_not_the_node_going_away_reach_the_client(bg, etcd, router, nodes, fail):
    req = request(ids=[0, 5, 9], max_tokens=10, ignore_eos=True)
    want = list(nodes[0].stub.Generate(req, timeout=30))
    dying = AttnNode(bg, etcd.endpoint, "attn-00-dying", DyingNode(want, 3, fail))
    got = []
    try:
        eventually(lambda: len(router.view.ready_attention_nodes()) == 3, DEADLINE_S, "router sees the dying node")
        with pytest.raises(grpc.RpcError) as exc:
            for response in router.stub.Generate(req, timeout=30):
                got.append(response)
    finally:
        dying.close()
    assert exc.value.code() == fail and "dying node fails" in exc.value.details()
    assert _tokens(got) == _tokens(want[:3])
    eventually(lambda: len(router.view.ready_attention_nodes()) == 2, DEADLINE_S, "dying node's record gone")


@pytest.mark.parametrize("mutate, field", [
    (lambda r: setattr(r.sampling, "max_tokens", 0), "max_tokens"),
    (lambda r: setattr(r.sampling, "temperature", -1.0), "temperature"),
    (lambda r: setattr(r.sampling, "top_p", 0.0), "top_p"),
    (lambda r: setattr(r.sampling, "top_k", 10**6), "top_k"),
    (lambda r: r.token_ids.ids.append(99999), "vocabulary"),
    (lambda r: r.ClearField("token_ids"), "prompt"),
    (lambda r: r.token_ids.ClearField("ids"), "token_ids is empty"),
    (lambda r: setattr(r, "text", ""), "text is empty"),
    (lambda r: r.sampling.stop.extend(["x"] * 40), "stop"),
    (lambda r: r.sampling.stop_token_ids.append(10**6), "stop_token_ids"),
    (lambda r: setattr(r.sampling, "logprobs", 21), "sampling.logprobs"),
    (lambda r: r.token_ids.ids.extend(list(range(2, 300)) * 7), "context"),
    (lambda r: setattr(r, "request_id", "bad\x00id"), "request_id"),
    (lambda r: r.resume_token_ids.append(3), "resume_token_ids"),
])
def test_invalid_fields_are_invalid_argument(router, mutate, field):
    req = request(ids=[0, 3], max_tokens=4)
    mutate(req)
    with pytest.raises(grpc.RpcError) as exc:
        collect(router.stub, req)
    assert exc.value.code() == Code.INVALID_ARGUMENT
    assert field in exc.value.details()
    assert collect(router.stub, request(ids=[0, 3], max_tokens=2))[0]  # still serving


def test_tokenize_model_info_and_cluster_status(router, nodes):
    got = router.stub.Tokenize(inference_pb2.TokenizeRequest(text="The river ran"), timeout=5)
    assert list(got.token_ids) == nodes[0].tokenizer.encode("The river ran")
    info = router.stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=5)
    assert (info.model_type, info.max_position_embeddings, info.has_tokenizer) == ("deepseek_v3", 2048, True)
    status = router.stub.ClusterStatus(inference_pb2.ClusterStatusRequest(), timeout=5)
    assert [(n.id, n.role, n.address, n.status) for n in status.nodes] == [
        ("attn-0", "attn", nodes[0].address, "ready"), ("attn-1", "attn", nodes[1].address, "ready")]
    assert all(n.cache_free == 1.0 and n.running == 0 for n in status.nodes)
    assert (status.placement_version, status.leader) == (0, "router-main")


def test_auth_token_required_on_inference_not_on_health(bg, etcd, nodes):
    r = start_router(bg, etcd, auth_token="s3cret-token")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{r.port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", "s3cret-token"),)):
                with pytest.raises(grpc.RpcError) as exc:
                    collect(stub, request(ids=[0, 3], max_tokens=2), metadata=metadata)
                assert exc.value.code() == Code.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as exc:
                    stub.ClusterStatus(inference_pb2.ClusterStatusRequest(), timeout=5, metadata=metadata)
                assert exc.value.code() == Code.UNAUTHENTICATED
            ok = (("authorization", "Bearer s3cret-token"),)
            assert collect(stub, request(ids=[0, 3], max_tokens=2), metadata=ok)[2].finish_reason == "length"
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        bg.run(r.stop(grace_s=1))


def test_bounded_inflight_is_resource_exhausted(bg, etcd, nodes):
    r = start_router(bg, etcd, max_inflight=1, max_queued=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{r.port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            long = stub.Generate(request(ids=[0, 5], max_tokens=1900, ignore_eos=True), timeout=60)
            next(long)
            with pytest.raises(grpc.RpcError) as exc:
                collect(stub, request(ids=[0, 3], max_tokens=2))
            assert exc.value.code() == Code.RESOURCE_EXHAUSTED and "--max-inflight 1" in exc.value.details()
            long.cancel()
            eventually(lambda: r.service.inflight == 0, DEADLINE_S, "the cancelled stream is released")
            assert collect(stub, request(ids=[0, 3], max_tokens=2))[0]
    finally:
        bg.run(r.stop(grace_s=1))


def _rejections(reason: str) -> float:
    return _router_metric("moemesh_admission_rejections_total", reason=reason)


def test_per_client_limits_queue_refuse_and_release_on_every_ending(bg, etcd, nodes):
    """Two clients (two tokens): a's share fills, b is served; cancel, deadline and errors free a's slots."""
    r = start_router(bg, etcd, auth_token=("tok-a", "tok-b"), max_running_per_client=1, max_queued_per_client=1)
    a, b = (("authorization", "Bearer tok-a"),), (("authorization", "Bearer tok-b"),)
    key_a = "token:" + hashlib.sha256(b"Bearer tok-a").hexdigest()[:32]
    admission = r.service.admission
    refused = _rejections("client_limit")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{r.port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            long = stub.Generate(request(ids=[0, 5], max_tokens=1900, ignore_eos=True), timeout=60, metadata=a)
            next(long)
            waiting = stub.Generate(request(ids=[0, 6], max_tokens=2), timeout=60, metadata=a)
            eventually(lambda: admission.counts(key_a) == (1, 1), DEADLINE_S, "a's second request queues")
            with pytest.raises(grpc.RpcError) as exc:
                collect(stub, request(ids=[0, 3], max_tokens=2), metadata=a)
            assert exc.value.code() == Code.RESOURCE_EXHAUSTED and "--max-queued-per-client 1" in exc.value.details()
            assert _rejections("client_limit") == refused + 1
            assert collect(stub, request(ids=[0, 3], max_tokens=2), metadata=b)[2].finish_reason == "length"

            waiting.cancel()  # the client leaves while queued
            eventually(lambda: admission.counts(key_a) == (1, 0), DEADLINE_S, "the cancelled queued request is released")
            with pytest.raises(grpc.RpcError) as exc:  # its deadline passes while queued
                list(stub.Generate(request(ids=[0, 6], max_tokens=2), timeout=1, metadata=a))
            assert exc.value.code() == Code.DEADLINE_EXCEEDED
            eventually(lambda: admission.counts(key_a) == (1, 0), DEADLINE_S, "the expired queued request is released")

            long.cancel()  # the client leaves while running
            eventually(lambda: admission.clients() == 0 and r.service.inflight == 0, DEADLINE_S,
                       "the cancelled running stream is released")
            with pytest.raises(grpc.RpcError) as exc:  # refused after admission: released too
                collect(stub, request(ids=[10**6], max_tokens=2), metadata=a)
            assert exc.value.code() == Code.INVALID_ARGUMENT
            # the client may hear the status before the handler's finally runs: poll
            eventually(lambda: admission.clients() == 0 and r.service.inflight == 0, DEADLINE_S,
                       "the refused request is released")
            assert collect(stub, request(ids=[0, 3], max_tokens=2), metadata=a)[2].finish_reason == "length"
            eventually(lambda: admission.clients() == 0, DEADLINE_S, "the finished stream is released")
    finally:
        bg.run(r.stop(grace_s=1))


def test_mtls_refuses_plaintext_and_clients_without_a_certificate(bg, etcd, nodes, tmp_path):
    mesh_certs(tmp_path)
    tls = role_tls(tmp_path, "router")
    r = start_router(bg, etcd, tls=tls)
    addr, ca = f"127.0.0.1:{r.port}", (tmp_path / "ca.pem").read_bytes()
    key, cert = (tmp_path / "client.key").read_bytes(), (tmp_path / "client.pem").read_bytes()
    info = inference_pb2.ModelInfoRequest()
    try:
        with grpc.secure_channel(addr, grpc.ssl_channel_credentials(ca, key, cert)) as channel:
            assert inference_pb2_grpc.InferenceStub(channel).ModelInfo(info, timeout=5).vocab_size > 0
        for channel in (grpc.insecure_channel(addr), grpc.secure_channel(addr, grpc.ssl_channel_credentials(ca))):
            with channel, pytest.raises(grpc.RpcError) as exc:
                inference_pb2_grpc.InferenceStub(channel).ModelInfo(info, timeout=3)
            assert exc.value.code() == Code.UNAVAILABLE
    finally:
        bg.run(r.stop(grace_s=1))


def test_stopped_node_requests_go_to_the_other(router, nodes):
    nodes[0].stop_server()  # the node idle ties would pick; its record stays "ready" in etcd
    served = [collect(router.stub, request(ids=[0, 3 + i], max_tokens=3))[3] for i in range(4)]
    assert served == ["attn-1"] * 4
    nodes[1].stop_server()
    with pytest.raises(grpc.RpcError) as exc:
        collect(router.stub, request(ids=[0, 3], max_tokens=3))
    assert exc.value.code() == Code.UNAVAILABLE and "no attention node could take the request" in exc.value.details()


ROUTER_MAIN = """
import argparse, sys
from moemesh import logs
from moemesh.router.main import add_router_parser, run_router
logs.configure("info")
parser = argparse.ArgumentParser()
add_router_parser(parser.add_subparsers(dest="command"))
sys.exit(run_router(parser.parse_args(sys.argv[1:])))
"""


def test_router_process_serves_until_sigterm_and_leaves_etcd(bg, etcd, tmp_path):
    import json
    import signal
    import sys

    token = tmp_path / "token"
    token.write_text("tok-123\n")
    proc = subprocess.Popen([sys.executable, "-c", ROUTER_MAIN, "router", "--etcd", etcd.endpoint, "--cluster", "proc",
                             "--router-id", "router-proc", "--lease-ttl", "5", "--auth-token-file", str(token)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher = bg.run(Registry.connect(etcd.endpoint, "proc"))
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready == {"event": "ready", "port": ready["port"], "router_id": "router-proc"}
        with grpc.insecure_channel(f"127.0.0.1:{ready['port']}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            status = inference_pb2_grpc.InferenceStub(channel).ClusterStatus(
                inference_pb2.ClusterStatusRequest(), timeout=5, metadata=(("authorization", "Bearer tok-123"),))
            assert list(status.nodes) == []
        eventually(lambda: bg.run(watcher.leader(watcher.keys.leader())) == "router-proc", DEADLINE_S, "the process leads")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert bg.run(watcher.leader(watcher.keys.leader())) is None  # leadership released at once
        assert '"router_stopped"' in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        bg.run(watcher.close())


def test_bad_flags_fail_before_serving(tmp_path):
    import argparse

    from moemesh.errors import MoemeshError
    from moemesh.router.main import add_router_parser, run_router

    parser = argparse.ArgumentParser()
    add_router_parser(parser.add_subparsers(dest="command"))
    (tmp_path / "empty").write_text("")
    for argv, message in [
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-ca", "ca.pem"], "--tls-ca needs --tls-cert"),
        (["--tls-cert", "missing.pem", "--tls-key", "missing.key"], "cannot read"),
        (["--auth-token-file", str(tmp_path / "empty")], "is empty"),
        (["--cluster", "a/b"], "cluster name"),
    ]:
        args = parser.parse_args(["router", "--etcd", "127.0.0.1:1", *argv])
        with pytest.raises((MoemeshError, ValueError), match=message):
            run_router(args)
    with pytest.raises(ValueError, match="HOST:PORT"):
        run_router(parser.parse_args(["router", "--etcd", "nowhere"]))
