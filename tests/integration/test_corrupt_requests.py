"""Request bytes that do not parse answer INVALID_ARGUMENT on every moemesh service, which goes on serving.

Each server is built by moemesh.wire.server.create_server; its status interceptor decodes leniently, so
grpc's own answer for a failed deserializer (UNKNOWN on grpc.aio, INTERNAL on thread-pool servers) never
reaches a client. The garbage goes out on a raw channel, with no request serializer.
"""

from __future__ import annotations

import grpc
import pytest

import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.attn_node.engine import EngineConfig
from moemesh.attn_node.engine_loop import EngineLoop
from moemesh.attn_node.service import AttentionService, attention_server
from moemesh.expert_node.server import DispatchService, dispatch_server
from moemesh.expert_node.shard import ExpertShard
from moemesh.launch.embedded import build_local
from moemesh.launch.mesh_processes import ProcessMesh, serve_control
from moemesh.model.tiny import write_tiny_checkpoint
from moemesh.router.server import Router
from moemesh.v1 import control_pb2, control_pb2_grpc, dispatch_pb2, dispatch_pb2_grpc, inference_pb2
from tests.helpers import BackgroundLoop

pytestmark = pytest.mark.integration
Code = grpc.StatusCode
GARBAGE = b"\xff\xff\xff\xff\x0f not a protobuf"  # a field tag with a varint that never ends


@pytest.fixture(scope="module")
def bg():
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), arch="deepseek_v3", hidden_size=64, layers=2,
                                 experts=8, experts_per_token=2)


def _raw(channel: grpc.Channel, method: str):
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def _assert_invalid(channel: grpc.Channel, method: str) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        _raw(channel, method)(GARBAGE, timeout=10)
    assert exc.value.code() == Code.INVALID_ARGUMENT, (method, exc.value.code(), exc.value.details())
    assert "does not parse" in exc.value.details()


def _assert_health_garbage_invalid_then_serving(channel: grpc.Channel) -> None:
    _assert_invalid(channel, "/grpc.health.v1.Health/Check")
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)


async def _started(build):
    server, port, health = build()  # on the loop that will serve it
    await server.start()
    return server, port, health


def test_attention_node(bg, tiny):
    mesh = build_local(tiny, "float32", EngineConfig(max_num_seqs=2, max_num_batched_tokens=16), progress=False)
    loop = EngineLoop(mesh.engine).start()
    server, port, _ = bg.run(_started(lambda: attention_server(AttentionService(loop, mesh.cfg, mesh.tokenizer))))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method in ("Generate", "Tokenize", "ModelInfo", "Load"):
                stream = method == "Generate"
                call = (channel.unary_stream if stream else channel.unary_unary)(
                    f"/moemesh.v1.AttentionNode/{method}", request_serializer=None, response_deserializer=None)
                with pytest.raises(grpc.RpcError) as exc:
                    list(call(GARBAGE, timeout=10)) if stream else call(GARBAGE, timeout=10)
                assert exc.value.code() == Code.INVALID_ARGUMENT, (method, exc.value.details())
            _assert_health_garbage_invalid_then_serving(channel)
            from moemesh.v1 import attention_pb2_grpc

            req = inference_pb2.GenerateRequest(sampling=inference_pb2.SamplingParams(max_tokens=2))
            req.token_ids.ids.extend([1, 2])
            got = list(attention_pb2_grpc.AttentionNodeStub(channel).Generate(req, timeout=30))
            assert got[-1].finish_reason in ("stop", "length")  # still serving
    finally:
        bg.run(server.stop(None))
        loop.stop()


def test_router(bg):
    router = Router("127.0.0.1:9", router_id="garbage-router")  # no etcd there: serves, calls UNAVAILABLE
    bg.run(router.start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            for method in ("Tokenize", "ModelInfo", "ClusterStatus"):
                _assert_invalid(channel, f"/moemesh.v1.Inference/{method}")
            generate = channel.unary_stream("/moemesh.v1.Inference/Generate", request_serializer=None,
                                            response_deserializer=None)
            with pytest.raises(grpc.RpcError) as exc:
                list(generate(GARBAGE, timeout=10))
            assert exc.value.code() == Code.INVALID_ARGUMENT and "does not parse" in exc.value.details()
            _assert_health_garbage_invalid_then_serving(channel)
            # Still serving: a well-formed call gets the router's own typed answer.
            from moemesh.v1 import inference_pb2_grpc

            with pytest.raises(grpc.RpcError) as exc:
                inference_pb2_grpc.InferenceStub(channel).ClusterStatus(inference_pb2.ClusterStatusRequest(),
                                                                        timeout=10)
            assert exc.value.code() == Code.UNAVAILABLE and "etcd" in exc.value.details()
    finally:
        bg.run(router.stop(0.1))


def test_expert_node(bg, tiny):
    from moemesh.model.config import ModelConfig

    cfg = ModelConfig.from_dir(tiny)
    service = DispatchService(ExpertShard(cfg.n_routed_experts, torch.float32), cfg)
    server, port, _ = bg.run(_started(lambda: dispatch_server(service)))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            _assert_invalid(channel, "/moemesh.v1.ExpertDispatch/Info")
            dispatch = channel.stream_stream("/moemesh.v1.ExpertDispatch/Dispatch", request_serializer=None,
                                             response_deserializer=None)
            with pytest.raises(grpc.RpcError) as exc:
                list(dispatch(iter([GARBAGE]), timeout=10))
            assert exc.value.code() == Code.INVALID_ARGUMENT and "does not parse" in exc.value.details()
            _assert_health_garbage_invalid_then_serving(channel)
            info = dispatch_pb2_grpc.ExpertDispatchStub(channel).Info(dispatch_pb2.InfoRequest(), timeout=10)
            assert info.n_routed_experts == cfg.n_routed_experts  # still serving
    finally:
        bg.run(server.stop(None))


def test_mesh_control(tmp_path):
    mesh = ProcessMesh(tmp_path, lambda name: ["true"])
    server, port = serve_control(mesh)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method in ("ListProcesses", "AddExpertNodes", "RemoveExpertNode"):
                _assert_invalid(channel, f"/moemesh.v1.MeshControl/{method}")
            _assert_health_garbage_invalid_then_serving(channel)
            stub = control_pb2_grpc.MeshControlStub(channel)
            assert list(stub.ListProcesses(control_pb2.ListProcessesRequest(), timeout=10).processes) == []
            # Domain errors raised by the (sync) servicer come out through the one table.
            with pytest.raises(grpc.RpcError) as exc:
                stub.RemoveExpertNode(control_pb2.RemoveExpertNodeRequest(name="expert-9"), timeout=10)
            assert exc.value.code() == Code.NOT_FOUND and "expert-9" in exc.value.details()
            with pytest.raises(grpc.RpcError) as exc:
                stub.AddExpertNodes(control_pb2.AddExpertNodesRequest(count=0), timeout=10)
            assert exc.value.code() == Code.INVALID_ARGUMENT and "count must be" in exc.value.details()
    finally:
        server.stop(None)
