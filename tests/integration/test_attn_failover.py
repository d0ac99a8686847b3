"""An attention node SIGKILLed mid-stream: the router resumes its generations on the other one.

Real processes (etcd, a router, two attention nodes, two expert nodes) on a tiny checkpoint, V3 and V3.2. The
same greedy requests run twice through the router: once fault-free, once while the attention node
serving them is killed after some tokens have streamed. Every stream of the second run must equal
the first: the same token ids (so none lost, none twice), the same text, the same finish and usage.

Nothing here asserts on timing; decoding is kept long (large max_tokens) so the kill lands mid-stream
even on a slow, shared machine.
"""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest

from moemesh.launch.etcd_server import EtcdServer
from moemesh.launch.procs import RoleProcess, spawn, stop_all, wait_ready
from moemesh.v1 import inference_pb2, inference_pb2_grpc
from tests.helpers import eventually

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

CLUSTER = "failover"
READY_TIMEOUT_S = 240.0
STREAM_TIMEOUT_S = 300.0
LONG = 320  # tokens: the kill must find these still streaming
STOP_PROMPT = "The river"


# V3.2: its index_topk (16) is far below LONG, so the survivor's resume re-prefills through the indexer's
# sparse selection and decodes sparsely, and must still give the fault-free tokens.
@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v32"])
def mesh(request, tmp_path_factory, tiny_checkpoint):
    """etcd, router, 2 expert nodes, 2 attention nodes; yields (router address, {attn node id: process})."""
    model = tiny_checkpoint(arch=request.param, hidden_size=64, layers=3, experts=8, experts_per_token=2)
    logs = tmp_path_factory.mktemp("logs")
    procs: list[RoleProcess] = []
    with EtcdServer(data_dir=tmp_path_factory.mktemp("etcd")) as etcd:
        common = ["--etcd", etcd.endpoint, "--cluster", CLUSTER]
        plan = [("router", ["router", *common, "--port", "0", "--lease-ttl", "5"])]
        plan += [(f"expert-{i}", ["expert-node", "--model", str(model), *common, "--node-id", f"expert-{i}",
                                  "--slots", "4"]) for i in range(2)]
        plan += [(f"attn-{i}", ["attn-node", "--model", str(model), *common, "--node-id", f"attn-{i}"])
                 for i in range(2)]
        try:
            for name, args in plan:
                procs.append(RoleProcess(name, spawn(name, args, logs, threads=1)))
            deadline = time.monotonic() + READY_TIMEOUT_S
            for p in procs:
                p.ready = wait_ready(p.proc, deadline, p.name)
            yield procs[0].address, {p.name: p for p in procs if p.name.startswith("attn-")}, logs
        finally:
            stop_all(procs)


def _request(prompt, max_tokens: int, stop: tuple[str, ...] = ()) -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(sampling=inference_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, stop=stop))
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


class Stream:
    """One Generate call read on its own thread; the test watches ``responses`` grow."""

    def __init__(self, stub, req: inference_pb2.GenerateRequest):
        self.call = stub.Generate(req, timeout=STREAM_TIMEOUT_S)
        self.responses: list[inference_pb2.GenerateResponse] = []
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.append(response)
        except grpc.RpcError as exc:
            self.error = exc

    def result(self) -> dict:
        self.thread.join(STREAM_TIMEOUT_S)
        assert not self.thread.is_alive(), "stream still running"
        assert self.error is None, f"{self.error.code()}: {self.error.details()}"
        trailing = dict(self.call.trailing_metadata() or ())
        last = self.responses[-1]
        return {
            "token_ids": [t for r in self.responses for t in r.token_ids],
            "text": "".join(r.text for r in self.responses),
            "finish_reason": [r.finish_reason for r in self.responses],
            "usage": (last.usage.prompt_tokens, last.usage.completion_tokens),
            "node": dict(self.call.initial_metadata() or ()).get("x-moemesh-node"),
            "nodes": trailing.get("x-moemesh-nodes", "").split(","),
            "resumes": int(trailing.get("x-moemesh-resumes", "-1")),
        }


def _run(stub, requests) -> list[dict]:
    streams = [Stream(stub, req) for req in requests]
    return [s.result() for s in streams]


def _late_stop_string(text: str) -> str:
    """A 3-character piece of ``text`` first found well past its middle, so a stream stops on it late."""
    for start in range(len(text) * 2 // 3, len(text) - 3):
        piece = text[start : start + 3]
        if text.find(piece) == start and piece.strip() and "\ufffd" not in piece:  # a stop a user could write
            return piece
    raise AssertionError(f"no late unique stop string in {text!r}")


def _same_stream(got: dict, want: dict) -> None:
    assert got["token_ids"] == want["token_ids"]  # nothing lost, nothing twice
    assert got["text"] == want["text"]
    assert got["finish_reason"] == want["finish_reason"]
    assert got["usage"] == want["usage"] and got["usage"][1] == len(got["token_ids"])


def _wait_for(probe, timeout_s: float, what: str) -> None:
    eventually(probe, timeout_s, what, interval_s=0.01)


def test_sigkill_attention_node_mid_stream_streams_continue_identically(mesh):
    router, attn, logs = mesh
    with grpc.insecure_channel(router) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        plain = _run(stub, [_request(STOP_PROMPT, LONG)])[0]
        stop = _late_stop_string(plain["text"])
        requests = [
            _request(STOP_PROMPT, LONG, stop=(stop,)),  # ends on a stop string, after the kill
            _request([0, 5, 9, 11], LONG),
            _request("Mixture of experts", LONG),
            _request([0, 40, 41, 42], LONG),
            _request("On Monday", 24),  # short: may finish before the kill
            _request([0, 7, 7, 7], LONG),
        ]
        want = _run(stub, requests)  # fault-free
        assert want[0]["finish_reason"][-1] == "stop" and stop not in want[0]["text"], want[0]
        assert plain["text"].startswith(want[0]["text"])

        streams = [Stream(stub, req) for req in requests]
        _wait_for(lambda: all(s.responses for s in streams), STREAM_TIMEOUT_S, "every stream's first token")
        victim = dict(streams[0].call.initial_metadata())["x-moemesh-node"]  # the node serving the stop request
        _wait_for(lambda: len(streams[0].responses) >= 8, STREAM_TIMEOUT_S, "8 tokens of the stop request")
        attn[victim].proc.send_signal(signal.SIGKILL)
        attn[victim].proc.wait(30)
        got = [s.result() for s in streams]

    for g, w in zip(got, want):
        _same_stream(g, w)
    survivor = next(name for name in attn if name != victim)
    assert got[0]["nodes"] == [victim, survivor] and got[0]["resumes"] == 1  # the stop request moved
    for g in got:
        if g["node"] == survivor:  # never touched by the kill
            assert g["nodes"] == [survivor] and g["resumes"] == 0
        else:  # moved, unless it finished before the kill
            assert g["nodes"] in ([victim], [victim, survivor]) and g["resumes"] == len(g["nodes"]) - 1
    router_log = (logs / "router.log").read_text()
    assert router_log.count('"generate_resumed"') == sum(g["resumes"] for g in got)
    assert f'"failed_node": "{victim}"' in router_log
