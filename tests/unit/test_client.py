"""The client SDK (router/client.py) against a scripted fake `moemesh.v1.Inference` servicer on a real gRPC
server on loopback. The fake tests the SDK's own logic (retries, deadlines, errors, metadata, TLS); the real
router is tested end to end elsewhere."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from moemesh.router import AsyncMeshClient, GenerateResult, MeshClient, MeshError, TokenChunk
from moemesh.router.client import ModelInfo, TokenLogprob, TopLogprob, Usage
from moemesh.sampling import SamplingParams
from moemesh.wire.status import NO_RETRY
from moemesh.v1 import inference_pb2, inference_pb2_grpc
from moemesh.wire.requests import sampling_from_proto
from tests.tls_certs import mesh_certs

Code = grpc.StatusCode
CHUNKS = [([11], "Hel"), ([12], "lo"), ([13, 14], " you")]


class FakeInference(inference_pb2_grpc.InferenceServicer):
    """Streams CHUNKS; records every call with its metadata; fails on a script."""

    def __init__(self):
        self.calls: list[tuple[str, object, dict[str, str]]] = []
        self.fail: list[Code] = []  # each call pops one and aborts with it, until empty
        self.fail_after_first: Code | None = None  # Generate aborts after its first chunk
        self.delay_s = 0.0  # every call waits this long first (or until the client gives up)
        self.release: threading.Event | None = None  # Generate holds after the first chunk until set
        self.cancelled = threading.Event()  # set when a held Generate sees its client go away
        self.address = ""
        self.trailing: tuple = ()  # trailing metadata of the scripted failures

    def _enter(self, method, request, context):
        self.calls.append((method, request, dict(context.invocation_metadata())))
        if self.fail:
            if self.trailing:
                context.set_trailing_metadata(self.trailing)
            context.abort(self.fail.pop(0), f"scripted failure of {method}")
        end = time.monotonic() + self.delay_s
        while time.monotonic() < end and context.is_active():
            time.sleep(0.005)

    def attempts(self, method="Generate"):
        return [c for c in self.calls if c[0] == method]

    def Generate(self, request, context):
        self._enter("Generate", request, context)
        if self.release is not None:
            # Also learn of a cancel from gRPC itself, in case it lands before the hold loop polls.
            context.add_callback(lambda: None if self.release.is_set() else self.cancelled.set())
        for i, (ids, text) in enumerate(CHUNKS):
            if i == 1 and self.fail_after_first is not None:
                context.abort(self.fail_after_first, "node lost mid-stream")
            if i == 1 and self.release is not None:
                end = time.monotonic() + 30  # held until released, or the client goes away
                while not self.release.wait(0.005) and time.monotonic() < end:
                    if not context.is_active():
                        self.cancelled.set()
                        return
            resp = inference_pb2.GenerateResponse(request_id=request.request_id, token_ids=ids, text=text)
            if request.sampling.HasField("logprobs"):  # one per token: its id, then k alternatives
                for t in ids:
                    lp = resp.logprobs.add(token_id=t, token=f"<{t}>", logprob=-0.5)
                    for a in range(request.sampling.logprobs):
                        lp.top.add(token_id=t + a, token=f"<{t + a}>", logprob=-0.5 - a)
            if i == len(CHUNKS) - 1:
                resp.finish_reason = "length"
                resp.usage.prompt_tokens = 2
                resp.usage.completion_tokens = 4
            yield resp

    def Tokenize(self, request, context):
        self._enter("Tokenize", request, context)
        return inference_pb2.TokenizeResponse(token_ids=[ord(c) for c in request.text])

    def ModelInfo(self, request, context):
        self._enter("ModelInfo", request, context)
        return inference_pb2.ModelInfoResponse(
            model_type="deepseek_v3", vocab_size=320, max_position_embeddings=256, num_hidden_layers=2,
            n_routed_experts=8, num_experts_per_tok=2, eos_token_ids=[1], has_tokenizer=True,
        )  # fmt: skip

    def ClusterStatus(self, request, context):
        self._enter("ClusterStatus", request, context)
        resp = inference_pb2.ClusterStatusResponse(placement_version=3, leader="router-a")
        node = resp.nodes.add(id="e0", role="expert", address="127.0.0.1:9", status="ready")
        node.experts.add(layer=1, experts=[0, 1, 2])
        resp.nodes.add(id="a0", role="attn", address="127.0.0.1:8", status="ready", running=2, cache_free=0.5)
        return resp


@pytest.fixture
def serve():
    """serve(servicer, credentials=None, port=0) -> port: a real gRPC server on 127.0.0.1, stopped at the end."""
    servers = []

    def start(servicer, credentials=None, port=0):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
        addr = f"127.0.0.1:{port}"
        port = server.add_secure_port(addr, credentials) if credentials else server.add_insecure_port(addr)
        server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(grace=None)


@pytest.fixture
def fake(serve):
    svc = FakeInference()
    svc.address = f"127.0.0.1:{serve(svc)}"
    return svc


def _expected(request_id: str) -> GenerateResult:
    return GenerateResult(request_id, [11, 12, 13, 14], "Hello you", "length", Usage(2, 4))


# ------------------------------------------------------------------------------------------ requests, results


def test_generate_folds_the_stream_and_sends_every_field(fake):
    with MeshClient(fake.address, token="  s3cret\n") as mesh:
        res = mesh.generate(
            "hi", max_tokens=4, temperature=0.0, top_p=0.9, top_k=5, seed=7, stop="\n", stop_token_ids=[2],
            ignore_eos=True,
        )  # fmt: skip
    [(_, req, md)] = fake.calls
    assert md["authorization"] == "Bearer s3cret"
    assert len(req.request_id) == 32 and int(req.request_id, 16) >= 0  # uuid4 hex, made by the client
    assert res == _expected(req.request_id)
    assert req.text == "hi" and req.WhichOneof("prompt") == "text"
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_k, s.seed, list(s.stop), list(s.stop_token_ids), s.ignore_eos) == (
        4, 0.0, 5, 7, ["\n"], [2], True,
    )  # fmt: skip
    assert s.top_p == pytest.approx(0.9)


def _logprob(t: int, k: int) -> TokenLogprob:
    return TokenLogprob(t, f"<{t}>", -0.5, tuple(TopLogprob(t + a, f"<{t + a}>", -0.5 - a) for a in range(k)))


def test_logprobs_are_asked_for_and_come_back_as_records(fake):
    with MeshClient(fake.address) as mesh:
        plain = mesh.generate("hi")
        res = mesh.generate("hi", logprobs=2)
        chunks = list(mesh.stream("hi", logprobs=0))
        with pytest.raises(ValueError, match="logprobs must be an integer in \\[0, 20\\]"):
            mesh.generate("hi", logprobs=21)
        with pytest.raises(ValueError, match="logprobs"):
            mesh.stream("hi", logprobs=-1)
    assert [c[1].sampling.HasField("logprobs") for c in fake.calls] == [False, True, True]
    assert fake.calls[1][1].sampling.logprobs == 2
    assert plain.logprobs is None
    assert res.logprobs == [_logprob(t, 2) for t in res.token_ids]
    assert [c.logprobs for c in chunks] == [[_logprob(t, 0) for t in ids] for ids, _ in CHUNKS]


def test_async_logprobs(fake):
    async def main():
        async with AsyncMeshClient(fake.address) as mesh:
            res = await mesh.generate("hi", logprobs=1)
            chunks = [c async for c in mesh.stream("hi", logprobs=1)]
            with pytest.raises(ValueError, match="logprobs"):
                await mesh.generate("hi", logprobs=True)
            return res, chunks

    res, chunks = asyncio.run(main())
    assert res.logprobs == [_logprob(t, 1) for t in [11, 12, 13, 14]]
    assert [lp for c in chunks for lp in c.logprobs] == res.logprobs


def test_prompt_ids_defaults_and_no_token(fake):
    with MeshClient(fake.address) as mesh:
        res = mesh.generate(prompt_ids=[5, 6, 7], request_id="mine")
    [(_, req, md)] = fake.calls
    assert "authorization" not in md
    assert list(req.token_ids.ids) == [5, 6, 7] and req.request_id == "mine" and res.request_id == "mine"
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.HasField("seed")) == (16, 1.0, 1.0, 0, False)


def test_params_is_sent_as_given_and_never_with_keywords(fake):
    params = SamplingParams(max_tokens=3, temperature=0.5, top_p=0.5, top_k=2, seed=1, stop=("x",))
    with MeshClient(fake.address) as mesh:
        mesh.generate(prompt_ids=[1], params=params)
        with pytest.raises(ValueError, match="not both"):
            mesh.generate(prompt_ids=[1], params=params, max_tokens=2)
        with pytest.raises(ValueError, match="top_p must be in"):
            mesh.generate(prompt_ids=[1], top_p=1.5)
    [(_, req, _)] = fake.calls
    assert sampling_from_proto(req.sampling, vocab_size=10) == params


def test_arguments_checked_before_sending(fake, tmp_path):
    with MeshClient(fake.address) as mesh:
        for kwargs in ({}, {"prompt": "a", "prompt_ids": [1]}):
            with pytest.raises(ValueError, match="exactly one of prompt"):
                mesh.generate(**kwargs)
        with pytest.raises(ValueError, match="exactly one of prompt"):
            mesh.stream()  # checked when called, not at the first next()
        with pytest.raises(ValueError, match="max_tokens"):
            mesh.generate("a", max_tokens=0)
        with pytest.raises(ValueError, match="prompt_ids"):
            mesh.generate(prompt_ids=[-1])
        with pytest.raises(ValueError, match="timeout_s"):
            mesh.generate("a", timeout_s=0)
    assert fake.calls == []
    token = tmp_path / "token"
    token.write_text("t0k\n")
    with pytest.raises(ValueError, match="not both"):
        MeshClient(fake.address, token="x", token_file=token)
    with pytest.raises(ValueError, match="empty"):
        MeshClient(fake.address, token=" \n")
    with pytest.raises(ValueError, match="server_name"):
        MeshClient(fake.address, server_name="x")
    with pytest.raises(ValueError, match="cert_file= and key_file="):
        MeshClient(fake.address, tls=True, cert_file=token)
    with MeshClient(fake.address, token_file=token) as mesh:
        assert mesh.tokenize("ab") == [97, 98]
    assert fake.calls[0][2]["authorization"] == "Bearer t0k"


def test_stream_yields_chunks_as_they_arrive(fake):
    fake.release = threading.Event()
    t0 = time.monotonic()
    with MeshClient(fake.address) as mesh:
        chunks = []
        for chunk in mesh.stream("hi"):
            chunks.append(chunk)
            fake.release.set()  # the server holds chunk 2 until the client has seen chunk 1
    assert time.monotonic() - t0 < 25  # not the server's 30 s hold: chunk 1 came before the stream ended
    assert chunks[0] == TokenChunk([11], "Hel")
    assert chunks[-1] == TokenChunk([13, 14], " you", "length", Usage(2, 4))
    assert [c.finish_reason for c in chunks] == [None, None, "length"]


def test_leaving_a_stream_early_cancels_the_call(fake):
    fake.release = threading.Event()
    with MeshClient(fake.address) as mesh:
        it = mesh.stream("hi")
        assert next(it) == TokenChunk([11], "Hel")
        it.close()
        assert fake.cancelled.wait(15)  # generous: only a missing cancel should fail this


def test_unary_calls(fake):
    with MeshClient(fake.address) as mesh:
        assert mesh.tokenize("hi") == [104, 105]
        info = mesh.model_info()
        status = mesh.cluster_status()
    assert isinstance(info, ModelInfo) and info.n_routed_experts == 8 and info.eos_token_ids == [1]
    assert status["placement_version"] == 3 and status["leader"] == "router-a"
    expert, attn = status["nodes"]
    assert expert["role"] == "expert" and expert["experts"] == [{"layer": 1, "experts": [0, 1, 2]}]
    assert attn["running"] == 2 and attn["cache_free"] == 0.5 and attn["experts"] == []


# ----------------------------------------------------------------------------------------- retries and errors


def test_unavailable_is_retried_with_backoff_and_one_request_id(fake):
    fake.fail = [Code.UNAVAILABLE, Code.UNAVAILABLE]
    t0 = time.monotonic()
    with MeshClient(fake.address, backoff_s=0.05) as mesh:
        res = mesh.generate("hi")
    elapsed = time.monotonic() - t0
    ids = {req.request_id for _, req, _ in fake.attempts()}
    assert len(fake.attempts()) == 3 and ids == {res.request_id}
    assert res == _expected(res.request_id)
    assert elapsed >= 0.8 * (0.05 + 0.10)  # two backoffs, jitter at most -20%


def test_unavailable_with_no_retry_pushback_is_final_at_once(fake):
    """The router says an unservable mesh is UNAVAILABLE with gRPC's "do not retry" pushback: no retry, no backoff."""
    fake.fail, fake.trailing = [Code.UNAVAILABLE] * 4, NO_RETRY
    with MeshClient(fake.address, backoff_s=5.0) as mesh:
        with pytest.raises(MeshError, match="^UNAVAILABLE: scripted failure of Generate$"):
            mesh.generate("hi")
        assert len(fake.attempts()) == 1  # a retry would have slept >= 4 s first

    async def main():
        async with AsyncMeshClient(fake.address, backoff_s=5.0) as mesh:
            with pytest.raises(MeshError, match="^UNAVAILABLE"):
                await mesh.generate("hi")
        assert len(fake.attempts()) == 2

    asyncio.run(main())


def test_unary_retry_and_giving_up(fake):
    fake.fail = [Code.UNAVAILABLE]
    with MeshClient(fake.address, backoff_s=0.01) as mesh:
        assert mesh.tokenize("a") == [97]
        assert len(fake.attempts("Tokenize")) == 2
        fake.fail = [Code.UNAVAILABLE] * 5
        with pytest.raises(MeshError) as e:
            mesh.model_info()
    assert e.value.status == "UNAVAILABLE" and len(fake.attempts("ModelInfo")) == 4  # 1 + retries=3


def test_failure_after_first_chunk_is_raised_mid_stream_not_retried(fake):
    fake.fail_after_first = Code.UNAVAILABLE
    with MeshClient(fake.address, backoff_s=0.01) as mesh:
        got = []
        with pytest.raises(MeshError) as e:
            for chunk in mesh.stream("hi"):
                got.append(chunk)
        assert got == [TokenChunk([11], "Hel")]
        assert e.value.code == Code.UNAVAILABLE and e.value.details == "node lost mid-stream"
        assert len(fake.attempts()) == 1
        with pytest.raises(MeshError, match="^UNAVAILABLE: node lost mid-stream$"):
            mesh.generate("hi")
        assert len(fake.attempts()) == 2


@pytest.mark.parametrize("code", [Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.UNAUTHENTICATED])
def test_other_errors_are_not_retried(fake, code):
    fake.fail = [code]
    with MeshClient(fake.address, backoff_s=0.01) as mesh:
        with pytest.raises(MeshError) as e:
            mesh.generate("hi")
    assert e.value.code == code and e.value.status == code.name
    assert str(e.value) == f"{code.name}: scripted failure of Generate"
    assert len(fake.attempts()) == 1


def test_deadlines(fake):
    fake.delay_s = 3.0
    with MeshClient(fake.address, timeout_s=0.2) as mesh:
        for call in (lambda: mesh.generate("hi"), lambda: list(mesh.stream("hi")), lambda: mesh.tokenize("a")):
            t0 = time.monotonic()
            with pytest.raises(MeshError) as e:
                call()
            assert e.value.status == "DEADLINE_EXCEEDED" and time.monotonic() - t0 < 1.5
        fake.delay_s = 0.3
        assert mesh.generate("hi", timeout_s=5).text == "Hello you"  # a per-call timeout overrides the default


def test_retries_until_the_server_comes_up(serve):
    import socket

    with socket.socket() as s:  # a free port, nothing listening on it yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    svc = FakeInference()
    timer = threading.Timer(0.3, serve, args=(svc,), kwargs={"port": port})
    timer.start()
    try:
        with MeshClient(f"127.0.0.1:{port}", retries=6, backoff_s=0.1, timeout_s=10) as mesh:
            assert mesh.generate("hi").text == "Hello you"
    finally:
        timer.join()
    assert len(svc.attempts()) == 1  # failed attempts never reached it


# ----------------------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """The mesh CA (moemesh certs), its router certificate also for moemesh.test as server.pem, and client.pem."""
    d = mesh_certs(tmp_path_factory.mktemp("certs"), sans=["moemesh.test"])
    for suffix in ("pem", "key"):
        shutil.copy(d / f"router.{suffix}", d / f"server.{suffix}")
    return d


def _server_credentials(certs: Path, mtls: bool) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes() if mtls else None,
        require_client_auth=mtls,
    )


def test_tls_server_certificate(serve, certs):
    svc = FakeInference()
    port = serve(svc, _server_credentials(certs, mtls=False))
    addr = f"127.0.0.1:{port}"
    with MeshClient(addr, ca_file=certs / "ca.pem", server_name="moemesh.test", token="t") as mesh:
        assert mesh.generate("hi").text == "Hello you"
    with MeshClient(addr, tls=True, ca_file=certs / "ca.pem") as mesh:  # the IP address is in the certificate
        assert mesh.tokenize("a") == [97]
    assert svc.calls[0][2]["authorization"] == "Bearer t"
    for kwargs in ({}, {"ca_file": certs / "ca.pem", "server_name": "other.test"}, {"tls": True}):
        with MeshClient(addr, retries=0, timeout_s=5, **kwargs) as mesh:  # plaintext / wrong name / unknown CA
            with pytest.raises(MeshError) as e:
                mesh.tokenize("a")
        assert e.value.status == "UNAVAILABLE", kwargs
    assert len(svc.calls) == 2


def test_mtls_requires_a_client_certificate(serve, certs):
    svc = FakeInference()
    addr = f"127.0.0.1:{serve(svc, _server_credentials(certs, mtls=True))}"
    tls = {"ca_file": certs / "ca.pem", "server_name": "moemesh.test"}
    with MeshClient(addr, retries=0, timeout_s=5, **tls) as mesh:
        with pytest.raises(MeshError) as e:
            mesh.generate("hi")
    assert e.value.status == "UNAVAILABLE"
    with MeshClient(addr, cert_file=certs / "client.pem", key_file=certs / "client.key", **tls) as mesh:
        assert mesh.generate("hi").text == "Hello you"
    assert len(svc.calls) == 1


# ------------------------------------------------------------------------------------------------ async client


def test_async_generate_stream_and_unary(fake):
    async def main():
        async with AsyncMeshClient(fake.address, token="tok") as mesh:
            res = await mesh.generate("hi", seed=1)
            chunks = [c async for c in mesh.stream(prompt_ids=[1, 2])]
            with pytest.raises(ValueError, match="exactly one of prompt"):
                mesh.stream()
            return res, chunks, await mesh.tokenize("hi"), await mesh.model_info(), await mesh.cluster_status()

    res, chunks, ids, info, status = asyncio.run(main())
    (_, req1, md), (_, req2, _) = fake.attempts()
    assert res == _expected(req1.request_id) and md["authorization"] == "Bearer tok"
    assert [c.token_ids for c in chunks] == [[11], [12], [13, 14]] and chunks[-1].usage == Usage(2, 4)
    assert list(req2.token_ids.ids) == [1, 2] and req2.request_id != req1.request_id
    assert ids == [104, 105] and info.model_type == "deepseek_v3" and status["placement_version"] == 3


def test_async_retries_and_errors(fake):
    async def main():
        async with AsyncMeshClient(fake.address, backoff_s=0.01) as mesh:
            fake.fail = [Code.UNAVAILABLE, Code.UNAVAILABLE]
            res = await mesh.generate("hi")
            assert {r.request_id for _, r, _ in fake.attempts()} == {res.request_id} and len(fake.attempts()) == 3

            fake.fail = [Code.UNAVAILABLE]
            assert await mesh.tokenize("a") == [97]

            fake.fail = [Code.INVALID_ARGUMENT]
            with pytest.raises(MeshError, match="^INVALID_ARGUMENT: scripted failure of Generate$"):
                await mesh.generate("hi")
            assert len(fake.attempts()) == 4

            fake.fail_after_first = Code.UNAVAILABLE
            got = []
            with pytest.raises(MeshError) as e:
                async for chunk in mesh.stream("hi"):
                    got.append(chunk)
            assert got == [TokenChunk([11], "Hel")] and e.value.status == "UNAVAILABLE"
            assert len(fake.attempts()) == 5
            fake.fail_after_first = None

            fake.delay_s = 3.0
            t0 = time.monotonic()
            with pytest.raises(MeshError) as e:
                await mesh.generate("hi", timeout_s=0.2)
            assert e.value.status == "DEADLINE_EXCEEDED" and time.monotonic() - t0 < 1.5

    asyncio.run(main())


def test_async_mtls(serve, certs):
    svc = FakeInference()
    addr = f"127.0.0.1:{serve(svc, _server_credentials(certs, mtls=True))}"
    tls = {"ca_file": certs / "ca.pem", "server_name": "moemesh.test"}

    async def main():
        async with AsyncMeshClient(addr, retries=0, timeout_s=5, **tls) as mesh:
            with pytest.raises(MeshError) as e:
                await mesh.generate("hi")
            assert e.value.status == "UNAVAILABLE"
        async with AsyncMeshClient(addr, cert_file=certs / "client.pem", key_file=certs / "client.key", **tls) as m:
            return await m.generate("hi")

    assert asyncio.run(main()).text == "Hello you"
