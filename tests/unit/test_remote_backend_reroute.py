"""RemoteExpertBackend.reroute: a shares-only placement change keeps the links."""

from __future__ import annotations

import pytest
import torch

from moemesh.attn_node.experts.remote_backend import RemoteExpertBackend
from moemesh.model.config import ModelConfig
from moemesh.control.placement import Placement
from moemesh.model.tiny import write_tiny_checkpoint
from moemesh.v1 import dispatch_pb2


class FakeLink:
    def __init__(self, address, connect_timeout_s, tls, cfg=None):
        self.address, self.failure, self.closed = address, None, False
        self.cfg = cfg

    def info(self, timeout_s=10.0):
        experts = [dispatch_pb2.LayerExperts(layer=layer, experts=list(range(self.cfg.n_routed_experts)))
                   for layer in self.cfg.moe_layers]
        return dispatch_pb2.InfoResponse(hidden_size=self.cfg.hidden_size, n_routed_experts=self.cfg.n_routed_experts,
                                         experts=experts)

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("m"), arch="deepseek_v3", hidden_size=32, layers=2,
                                 experts=4, experts_per_token=2)
    return ModelConfig.from_dir(path)


def _placement(cfg, version, share):
    replicas = {(layer, e): (0, 1) for layer in cfg.moe_layers for e in range(cfg.n_routed_experts)}
    shares = {key: (share, 1 - share) for key in replicas}
    return Placement(("a:1", "b:2"), replicas, version, shares)


def test_reroute_changes_the_split_and_keeps_the_links(cfg):
    made = []

    def factory(address, timeout, tls):
        made.append(FakeLink(address, timeout, tls, cfg))
        return made[-1]

    backend = RemoteExpertBackend(cfg, _placement(cfg, 1, 1.0), link_factory=factory)
    layer = cfg.moe_layers[0]
    idx = torch.zeros(100, 1, dtype=torch.int64)
    assert backend._assign(layer, idx).unique().tolist() == [0]
    backend.reroute(_placement(cfg, 2, 0.0))
    assert backend._assign(layer, idx).unique().tolist() == [1]
    assert backend.placement.version == 2 and len(made) == 2 and not any(link.closed for link in made)
    moved = Placement(("a:1", "b:2"), {k: (0,) for k in _placement(cfg, 3, 1.0).replicas}, 3)
    with pytest.raises(ValueError, match="same nodes and replicas"):
        backend.reroute(moved)
