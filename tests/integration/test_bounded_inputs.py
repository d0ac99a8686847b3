"""Bounded inputs on real servers: the expert node's message limit, the attention side's split to fit it,
MeshControl's bound on expert nodes, and long request-provided names cut in error messages."""

from __future__ import annotations

import grpc
import pytest

import torch

from moemesh.attn_node.experts.remote_backend import NodeLink
from moemesh.expert_node.loader import load_expert_shard
from moemesh.expert_node.server import DispatchService, compute, dispatch_server, message_limit
from moemesh.launch.mesh_processes import ProcessMesh, serve_control
from moemesh.model.config import ModelConfig
from moemesh.model.tiny import write_tiny_checkpoint
from moemesh.router.server import Router
from moemesh.v1 import control_pb2, control_pb2_grpc, dispatch_pb2, dispatch_pb2_grpc, inference_pb2
from moemesh.v1 import inference_pb2_grpc
from moemesh.wire.codec import to_proto
from tests.helpers import BackgroundLoop

pytestmark = pytest.mark.integration
Code = grpc.StatusCode
STEP = 4  # the expert node's --max-batched-tokens in these tests


@pytest.fixture(scope="module")
def bg():
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def expert_node(bg, tmp_path_factory):
    """A real expert node serving every expert of a tiny model, its limit sized for steps of STEP tokens."""
    model = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), arch="deepseek_v3", hidden_size=64, layers=2,
                                  experts=8, experts_per_token=2)
    cfg = ModelConfig.from_dir(model)
    shard = load_expert_shard(str(model), cfg, None, progress=False)
    service = DispatchService(shard, cfg, "", message_limit(cfg, STEP))

    async def start():
        server, port, _ = dispatch_server(service)
        await server.start()
        return server, port

    server, port = bg.run(start())
    yield cfg, shard, f"127.0.0.1:{port}"
    bg.run(server.stop(None))


def _request(cfg: ModelConfig, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cfg.hidden_size, generator=g)  # [T, D]
    idx = torch.randint(0, cfg.n_routed_experts, (rows, cfg.num_experts_per_tok), generator=g)  # [T, K]
    w = torch.rand(rows, cfg.num_experts_per_tok, generator=g)  # [T, K]
    return x, idx, w


def _message(layer: int, x, idx, w) -> dispatch_pb2.DispatchRequest:
    return dispatch_pb2.DispatchRequest(id=1, layer=layer, hidden=to_proto(x), topk_idx=to_proto(idx),
                                        topk_weights=to_proto(w))


def test_a_message_above_the_expert_nodes_limit_is_refused_and_the_node_keeps_serving(expert_node):
    cfg, _, address = expert_node
    layer = cfg.moe_layers[0]
    big_rows = message_limit(cfg, STEP) // (cfg.hidden_size * 4) + 1  # float32 hidden alone exceeds the limit
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = dispatch_pb2_grpc.ExpertDispatchStub(channel)
        assert stub.Info(dispatch_pb2.InfoRequest(), timeout=10).max_message_bytes == message_limit(cfg, STEP)
        with pytest.raises(grpc.RpcError) as exc:
            list(stub.Dispatch(iter([_message(layer, *_request(cfg, big_rows))]), timeout=30))
        assert exc.value.code() == Code.RESOURCE_EXHAUSTED, exc.value.details()
        # still serving: a step of STEP rows is answered
        replies = list(stub.Dispatch(iter([_message(layer, *_request(cfg, STEP))]), timeout=30))
        assert [tuple(r.output.shape) for r in replies] == [(STEP, cfg.hidden_size)]


def test_an_attention_nodes_larger_step_is_split_to_fit_the_node(expert_node):
    cfg, shard, address = expert_node
    layer = cfg.moe_layers[0]
    x, idx, w = _request(cfg, 3 * STEP + 1, seed=1)
    link = NodeLink(address)
    try:
        link.info()  # learns the node's limit
        sent = []
        link._outbox = _Recording(link._outbox, sent)
        got = link.send(layer, x, idx, w, version=0).result(30)
    finally:
        link.close()
    assert [r.hidden.shape[0] for r in sent] == [STEP, STEP, STEP, 1]  # 4 messages, none above the limit
    assert all(r.ByteSize() <= message_limit(cfg, STEP) for r in sent)
    torch.testing.assert_close(got, compute(shard, layer, x, idx, w))  # the same rows as one message, in order


class _Recording:
    """A link's outbox that keeps what goes through it."""

    def __init__(self, outbox, sent: list):
        self.outbox, self.sent = outbox, sent

    def put(self, req) -> None:
        if req is not None:
            self.sent.append(req)
        self.outbox.put(req)

    def get(self):
        return self.outbox.get()


def test_mesh_control_refuses_a_count_above_its_bound(tmp_path):
    mesh = ProcessMesh(tmp_path, lambda name: ["true"], max_experts=2)
    server, port = serve_control(mesh)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = control_pb2_grpc.MeshControlStub(channel)
            for count in (3, 64, 2**32 - 1):
                with pytest.raises(grpc.RpcError) as exc:
                    stub.AddExpertNodes(control_pb2.AddExpertNodesRequest(count=count), timeout=10)
                assert exc.value.code() == Code.INVALID_ARGUMENT
                assert "count must be 1..2" in exc.value.details() and "at most 2 expert nodes" in exc.value.details()
            assert list(stub.ListProcesses(control_pb2.ListProcessesRequest(), timeout=10).processes) == []
            with pytest.raises(grpc.RpcError) as exc:  # a long name is cut in the error
                stub.RemoveExpertNode(control_pb2.RemoveExpertNodeRequest(name="n" * 10_000), timeout=10)
            assert exc.value.code() == Code.NOT_FOUND and len(exc.value.details()) < 300
    finally:
        server.stop(None)


def test_a_10kb_request_id_is_cut_in_the_error_message(bg):
    router = Router("127.0.0.1:9", router_id="bounds-router")  # no etcd there: it still checks requests
    bg.run(router.start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            req = inference_pb2.GenerateRequest(request_id="r" * 10_000,
                                                sampling=inference_pb2.SamplingParams(max_tokens=2))
            req.token_ids.ids.extend([1, 2])
            with pytest.raises(grpc.RpcError) as exc:
                list(inference_pb2_grpc.InferenceStub(channel).Generate(req, timeout=10))
            details = exc.value.details()
            assert exc.value.code() == Code.INVALID_ARGUMENT
            assert "request_id" in details and "(+9936 chars)" in details and len(details) < 300, details
    finally:
        bg.run(router.stop(0.1))
