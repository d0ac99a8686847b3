"""SocketPair.recv_reply (p2p_native.c mm_take): the attention node's reply received, checked for length and
copied into the caller's tensor in one C call, over the extension and the ctypes library."""

from __future__ import annotations

import socket

import pytest
import torch

from moemesh.wire import p2p
from moemesh.wire.p2p_socket import SocketPair
from tests.unit.test_p2p_stream import use_frame_loop


@pytest.fixture(params=["ext", "ctypes"])
def c_loop(request, monkeypatch):
    use_frame_loop(request.param, monkeypatch)


def _pair(staging_bytes: int = 1 << 20) -> tuple[SocketPair, SocketPair]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname()[:2])
        peer, _ = server.accept()
    return SocketPair(client, 5.0), SocketPair(peer, 5.0, staging_bytes=staging_bytes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("staging", [1 << 20, 256])  # the reply staged whole, or larger than the staging buffer
def test_a_reply_lands_in_the_callers_tensor_with_its_prefix(c_loop, dtype, staging):
    node, attn = _pair(staging)
    y = torch.randn(5, 16).to(dtype)
    for msg_id in (7, 8):  # two in a row: the staging buffer's bookkeeping carries on
        node.send_reply((msg_id, 0, 11, 22, 33), y * msg_id)
    for msg_id in (7, 8):
        out = torch.empty(5, 16, dtype=dtype)
        size = p2p.REPLY_PREFIX + y.numel() * y.element_size()
        assert attn.recv_reply(5.0, size, out) == (msg_id, 0, 11, 22, 33)
        assert torch.equal(out, y * msg_id)


def test_a_shorter_reply_gives_its_length_and_a_longer_one_ends_the_pair(c_loop):
    node, attn = _pair()
    node.send_reply((1, 0, 0, 0, 0), torch.zeros(2, 4))
    out = torch.empty(3, 4)
    size = p2p.REPLY_PREFIX + out.numel() * 4
    assert attn.recv_reply(5.0, size, out) == p2p.REPLY_PREFIX + 2 * 4 * 4  # the caller names it: out of step
    node.send_reply((2, 0, 0, 0, 0), torch.zeros(4, 4))
    with pytest.raises(RuntimeError, match="a message of 104 bytes for a buffer of 88"):
        attn.recv_reply(5.0, size, out)


def test_a_closed_peer_is_the_usual_error(c_loop):
    node, attn = _pair()
    node.close()
    with pytest.raises(RuntimeError, match="closed"):
        attn.recv_reply(5.0, p2p.REPLY_PREFIX + 16, torch.empty(1, 4))


def test_an_out_of_another_size_is_named_and_the_stream_stays_in_step(c_loop):
    """A caller's ``out`` that does not fit the reply asked for is its own mistake: a ValueError that says so, found
    before a byte is read, so the reply is still there for a call that fits (not "a reply of N bytes where N were
    due", which blames the peer)."""
    node, attn = _pair()
    y = torch.randn(2, 4)
    node.send_reply((3, 0, 0, 0, 0), y)
    size = p2p.REPLY_PREFIX + y.numel() * 4
    with pytest.raises(ValueError, match="out holds 48 bytes; a reply of 72 bytes carries 32 bytes of rows"):
        attn.recv_reply(5.0, size, torch.empty(3, 4))
    out = torch.empty(2, 4)
    assert attn.recv_reply(5.0, size, out) == (3, 0, 0, 0, 0) and torch.equal(out, y)


def test_an_out_that_is_not_contiguous_host_memory_is_refused_before_a_byte_is_read(c_loop):
    """C writes numel * itemsize bytes at ``out``'s data pointer: an expanded view (more elements than storage) or
    a strided one would be written past or across its memory, so both are refused, and the reply stays readable."""
    node, attn = _pair()
    y = torch.randn(2, 4)
    node.send_reply((4, 0, 0, 0, 0), y)
    size = p2p.REPLY_PREFIX + y.numel() * 4
    with pytest.raises(ValueError, match="contiguous host tensor"):
        attn.recv_reply(5.0, size, torch.empty(1, 4).expand(2, 4))
    with pytest.raises(ValueError, match="contiguous host tensor"):
        attn.recv_reply(5.0, size, torch.empty(4, 2).t())
    out = torch.empty(2, 4)
    assert attn.recv_reply(5.0, size, out) == (4, 0, 0, 0, 0) and torch.equal(out, y)


def test_a_reply_that_is_not_contiguous_host_memory_is_refused_before_a_byte_is_sent(c_loop):
    """The reply's C call reads numel * itemsize bytes at ``y``'s data pointer: a strided or expanded ``y`` would
    send other memory than its rows, so it is refused, and the stream stays in step for the next reply."""
    node, attn = _pair()
    with pytest.raises(ValueError, match="contiguous host tensor"):
        node.send_reply((5, 0, 0, 0, 0), torch.randn(4, 2).t())
    with pytest.raises(ValueError, match="contiguous host tensor"):
        node.send_reply((5, 0, 0, 0, 0), torch.randn(1, 4).expand(2, 4))
    y = torch.randn(2, 4)
    node.send_reply((5, 0, 0, 0, 0), y)
    out = torch.empty(2, 4)
    assert attn.recv_reply(5.0, p2p.REPLY_PREFIX + y.numel() * 4, out) == (5, 0, 0, 0, 0) and torch.equal(out, y)
