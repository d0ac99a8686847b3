"""RemoteExpertBackend's tensor path on (fake) CUDA: no CPU tensor, no host sync, one D2H copy per node per layer.

The link is a stand-in for the network: it stages each message through the real :class:`HostStaging` (the one
copy to pinned host memory the gRPC transport makes) and answers with zeros on the device. The copy's CUDA event
does not exist on this build, so its wait is a no-op here; everything else is the backend's own code.
"""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from moemesh.attn_node.experts import remote_backend
from moemesh.attn_node.experts.remote_backend import HostStaging, RemoteExpertBackend
from moemesh.control.placement import Placement
from moemesh.model.config import ModelConfig
from moemesh.model.tiny import write_tiny_checkpoint
from moemesh.v1 import dispatch_pb2, tensor_pb2
from moemesh.wire.codec import from_proto, to_proto
from torch._subclasses.fake_tensor import FakeTensorMode

from tests.fake_cuda import CUDA, DeviceAudit, fake_cuda

pytestmark = [pytest.mark.unit, pytest.mark.fake_cuda]

N_NODES = 3
# views of the staging buffer (the message's ids, weights and rows): metadata, no data made on the host
HOST_VIEWS = {"aten.slice.Tensor", "aten.view.default", "aten.view.dtype", "aten.detach.default"}


class StagingLink:
    def __init__(self, address, connect_timeout_s, tls, cfg):
        self.address, self.failure, self.cfg = address, None, cfg
        self.staging = HostStaging(CUDA)
        self.sent: list[tuple[int, int]] = []  # (layer, rows)

    def info(self, timeout_s=10.0):
        experts = [dispatch_pb2.LayerExperts(layer=layer, experts=list(range(self.cfg.n_routed_experts)))
                   for layer in self.cfg.moe_layers]
        return dispatch_pb2.InfoResponse(hidden_size=self.cfg.hidden_size, n_routed_experts=self.cfg.n_routed_experts,
                                         experts=experts)

    def send(self, layer, x, idx, w, version, trim=False):
        assert x.device == idx.device == w.device == CUDA
        with self.staging(x, idx, w) as (hx, hidx, hw):  # the transport's one copy to host memory
            assert hx.device.type == hidx.device.type == hw.device.type == "cpu"
        self.sent.append((layer, x.shape[0]))
        fut: Future = Future()
        fut.set_result(torch.zeros_like(x))  # a reply on the device (a fake one cannot say how many rows had work)
        return fut

    def close(self):
        pass


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("m"), arch="deepseek_v3", hidden_size=32, layers=3,
                                 experts=6, experts_per_token=2)
    return ModelConfig.from_dir(path)


def _placement(cfg):
    # experts 0-1 on node 0, 2-3 on node 1, 4-5 on nodes 1 and 2 (a replicated pair, split by shares)
    hosts = {0: (0,), 1: (0,), 2: (1,), 3: (1,), 4: (1, 2), 5: (1, 2)}
    replicas = {(layer, e): hosts[e] for layer in cfg.moe_layers for e in range(cfg.n_routed_experts)}
    return Placement(tuple(f"n{i}:1" for i in range(N_NODES)), replicas, 1)


def _step(backend, cfg, x, idx, w):
    return [backend.combine(backend.dispatch(layer, x, idx, w)) for layer in cfg.moe_layers]


def test_dispatch_and_combine_stay_on_the_device(cfg, monkeypatch):
    monkeypatch.setattr(remote_backend, "_copy_done", lambda device: None)  # no CUDA runtime: no event to wait on
    links = []

    def factory(address, connect_timeout_s, tls):
        links.append(StagingLink(address, connect_timeout_s, tls, cfg))
        return links[-1]

    t, k, d = 5, cfg.num_experts_per_tok, cfg.hidden_size
    with fake_cuda() as fake:
        backend = RemoteExpertBackend(cfg, _placement(cfg), link_factory=factory, device=CUDA)
        x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
        idx = torch.zeros(t, k, dtype=torch.int64, device="cuda")
        w = torch.rand(t, k, device="cuda")
        _step(backend, cfg, x, idx, w)  # warm-up: the staging buffers are allocated (once per link)
        with fake.audit() as audit:
            outs = _step(backend, cfg, x, idx, w)
    assert all(out.device == CUDA and out.shape == (t, d) and out.dtype == torch.bfloat16 for out in outs)
    # exactly one copy to host memory per node per layer: the packed message (ids, weights, rows)
    message_bytes = t * k * 8 + t * k * 4 + t * d * 2
    copies = [("aten.copy_.default", (message_bytes,))] * (N_NODES * len(cfg.moe_layers))
    assert [op for op in audit.cpu_ops if op[0] not in HOST_VIEWS] == copies
    assert {name for name, _ in audit.cpu_ops} <= HOST_VIEWS | {"aten.copy_.default"}
    assert audit.uploads == []
    assert [len(link.sent) for link in links] == [2 * len(cfg.moe_layers)] * N_NODES


def test_codec_to_a_device_is_one_upload():
    msg = to_proto(torch.arange(6, dtype=torch.float32).view(2, 3))
    # the decoded bytes are real host memory, so this fake mode must let a real tensor in (fake_cuda() refuses)
    with FakeTensorMode(allow_non_fake_inputs=True), DeviceAudit() as audit:
        t = from_proto(msg, device=CUDA, expect_ndim=2)
    assert t.device == CUDA and t.shape == (2, 3) and t.dtype == torch.float32
    assert audit.cpu_ops == [("aten.view.default", (2, 3))]  # the view over the message's bytes; then one upload


def test_codec_from_a_device_is_one_copy_to_host():
    with fake_cuda() as fake:
        x = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)
        with fake.audit() as audit:
            host = x.cpu()  # what to_proto does first with a device tensor (numpy needs real data: not here)
    assert [op for op, _ in audit.cpu_ops] == ["aten._to_copy.default"] and host.device.type == "cpu"


def test_codec_device_round_trip_on_the_cpu_build():
    t = torch.randn(3, 4).to(torch.bfloat16)
    back = from_proto(to_proto(t), device="cpu")
    assert torch.equal(back, t)
    assert isinstance(to_proto(t), tensor_pb2.Tensor)
