"""The expert node's stream loop counts in Prometheus only what it computes and answers
(expert_node/torch_server.py): a request rejected by the re-check against a changed shard, one whose forward
raises and one whose reply cannot be sent are not counted (the C receive checks without counting; the reply's C
call counts once it is sent)."""

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


@pytest.fixture
def served(tiny_checkpoint):
    """(svc, cfg, layer): a shard hosting experts 0-3 of the first MoE layer."""
    if p2p_native.load() is None:
        pytest.skip("no C compiler here: the C receive and reply cannot be built")
    path = tiny_checkpoint(hidden_size=32, layers=2, experts=8, experts_per_token=2)
    cfg = ModelConfig.from_dir(path)
    layer = cfg.moe_layers[0]
    return DispatchService(load_expert_shard(str(path), cfg, {layer: [0, 1, 2, 3]}, progress=False), cfg), cfg, layer


def _request(cfg, layer: int, two_messages: bool = False) -> tuple[SocketPair, SocketPair, list[float]]:
    """(sender, the node's pair, the counts of experts 0-3 before): one request for experts 0-3 sent already."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname()[:2])
        peer, _ = server.accept()
    sender, pair = SocketPair(client, 5.0), SocketPair(peer, 5.0)
    x, idx, w = torch.randn(2, cfg.hidden_size), torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5)
    for parts in p2p.request_parts(0, layer, x, idx, w, 0, 0 if two_messages else p2p.INLINE_BYTES):
        sender.send_parts(parts)
    return sender, pair, [_tokens(layer, e) for e in range(4)]


@pytest.mark.parametrize("two_messages", [False, True])  # checked in the C receive, or by mm_check_rows after it
def test_a_request_whose_forward_raises_is_not_counted(served, monkeypatch, two_messages):
    svc, cfg, layer = served

    def broken(*args, **kwargs):
        raise RuntimeError("the shard failed")

    monkeypatch.setattr(svc.shard, "forward", broken)
    _, pair, before = _request(cfg, layer, two_messages)
    session = _Session(svc, "127.0.0.1:1", "t/", "tcp", "127.0.0.1", 5.0, 5.0, 0)
    with pytest.raises(RuntimeError, match="the shard failed"):
        session._serve_stream(pair)
    assert [_tokens(layer, e) for e in range(4)] == before  # flushed at the end: nothing of the failed request


def test_a_request_whose_reply_cannot_be_sent_is_not_counted(served, monkeypatch):
    svc, cfg, layer = served
    sender, pair, before = _request(cfg, layer)
    forward = svc.shard.forward

    def then_the_peer_goes(*args, **kwargs):
        y = forward(*args, **kwargs)
        pair._out.shutdown(socket.SHUT_WR)  # the reply's send fails (EPIPE)
        return y

    monkeypatch.setattr(svc.shard, "forward", then_the_peer_goes)
    session = _Session(svc, "127.0.0.1:1", "t/", "tcp", "127.0.0.1", 5.0, 5.0, 0)
    with pytest.raises(p2p.P2PError, match="send failed"):
        session._serve_stream(pair)
    assert [_tokens(layer, e) for e in range(4)] == before


def test_a_request_that_is_answered_is_counted_once(served):
    svc, cfg, layer = served
    sender, pair, before = _request(cfg, layer)
    sender.send_parts([p2p._HEADER.pack(p2p.KIND_BYE, 0, 0, 0, 0, 0, 0, 0)])
    _Session(svc, "127.0.0.1:1", "t/", "tcp", "127.0.0.1", 5.0, 5.0, 0)._serve_stream(pair)
    assert [_tokens(layer, e) - b for e, b in enumerate(before)] == [1, 1, 1, 1]


def test_a_request_the_stale_snapshot_recheck_rejects_is_not_counted(served, monkeypatch):
    svc, cfg, layer = served

    class DroppedAfterTheTablesWereMade(torch_server.FrameChecks):
        def __init__(self, *args):
            super().__init__(*args)
            svc.shard.drop_experts(layer, [3])  # the C receive still checks against 0-3 hosted

    monkeypatch.setattr(torch_server, "FrameChecks", DroppedAfterTheTablesWereMade)
    sender, pair, before = _request(cfg, layer)
    session = _Session(svc, "127.0.0.1:1", "t/", "tcp", "127.0.0.1", 5.0, 5.0, 0)
    with pytest.raises(BadRequest, match="experts \\[3\\] are not hosted on this node"):
        session._serve_stream(pair)
    assert [_tokens(layer, e) for e in range(4)] == before  # flushed at the end: nothing of the rejected request
