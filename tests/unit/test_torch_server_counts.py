"""The expert node's stream loop counts in Prometheus only what it computes (expert_node/torch_server.py): a
request the C receive checked, and counted, against tables the shard has changed since, and that the re-check
then rejects, is taken back out of the counts."""

from __future__ import annotations

import socket

import pytest
import torch

from moemesh import metrics
from moemesh.expert_node import torch_server
from moemesh.expert_node.loader import load_expert_shard
from moemesh.expert_node.server import BadRequest, DispatchService
from moemesh.expert_node.torch_server import _Session
from moemesh.model.config import ModelConfig
from moemesh.wire import p2p, p2p_native
from moemesh.wire.p2p_socket import SocketPair


def _tokens(layer: int, expert: int) -> float:
    return metrics.EXPERT_TOKENS.labels(str(layer), str(expert))._value.get()


def test_a_request_the_stale_snapshot_recheck_rejects_is_not_counted(tiny_checkpoint, monkeypatch):
    if p2p_native.load() is None:
        pytest.skip("no C compiler here: the C receive (which counts as it checks) cannot be built")
    path = tiny_checkpoint(hidden_size=32, layers=2, experts=8, experts_per_token=2)
    cfg = ModelConfig.from_dir(path)
    layer = cfg.moe_layers[0]
    svc = DispatchService(load_expert_shard(str(path), cfg, {layer: [0, 1, 2, 3]}, progress=False), cfg)

    class DroppedAfterTheTablesWereMade(torch_server.FrameChecks):
        def __init__(self, *args):
            super().__init__(*args)
            svc.shard.drop_experts(layer, [3])  # the C receive still checks against 0-3 hosted

    monkeypatch.setattr(torch_server, "FrameChecks", DroppedAfterTheTablesWereMade)
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname()[:2])
        peer, _ = server.accept()
    sender, pair = SocketPair(client, 5.0), SocketPair(peer, 5.0)
    x, idx, w = torch.randn(2, cfg.hidden_size), torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5)
    (parts,) = p2p.request_parts(0, layer, x, idx, w, 0, p2p.INLINE_BYTES)
    sender.send_parts(parts)
    before = [_tokens(layer, e) for e in range(4)]
    session = _Session(svc, "127.0.0.1:1", "t/", "tcp", "127.0.0.1", 5.0, 5.0, 0)
    with pytest.raises(BadRequest, match="experts \\[3\\] are not hosted on this node"):
        session._serve_stream(pair)
    assert [_tokens(layer, e) for e in range(4)] == before  # flushed at the end: nothing of the rejected request
