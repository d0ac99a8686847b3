"""The lean host path of the torch transport: gathered frame parts, the tcp stream's one-read messages, and
the expert node's stream loop (moemesh/wire/p2p.py, p2p_socket.py, expert_node/torch_server.py)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from moemesh.expert_node.loader import load_expert_shard
from moemesh.expert_node.server import BadRequest, DispatchService
from moemesh.expert_node.torch_server import _Session
from moemesh.model.config import ModelConfig
from moemesh.wire import p2p, p2p_native
from moemesh.wire.p2p_socket import SocketPair


def use_frame_loop(kind: str, monkeypatch) -> None:
    """Pairs made after this use ``kind``: "ext" (the C frame loop as a CPython extension, p2p_ext.c), "ctypes"
    (the same C through ctypes, its fallback) or "python" (no C)."""
    if kind == "python":
        monkeypatch.setattr(p2p_native, "load", lambda: None)
        return
    lib = p2p_native.load_ctypes() if kind == "ctypes" else p2p_native.load()
    if lib is None:
        pytest.skip("no C compiler here: the C frame loop cannot be built")
    if kind == "ext" and not hasattr(lib, "__file__"):  # load() fell back to ctypes (no Python.h)
        pytest.skip("the CPython extension cannot be built here (no Python.h)")
    monkeypatch.setattr(p2p_native, "load", lambda: lib)


FRAME_LOOPS = ["ext", "ctypes", "python"]


@pytest.fixture(params=FRAME_LOOPS)
def frame_loop(request, monkeypatch):
    """Every stream test runs over the C frame loop (p2p_native.c: as an extension module and through ctypes) and
    over the Python path: the same bytes, the same errors."""
    use_frame_loop(request.param, monkeypatch)
    return request.param


def _joined(parts) -> bytes:
    return b"".join(bytes(memoryview(p).cast("B")) for p in parts)


def _rows(rows=3, hidden=8, k=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    idx = torch.randint(0, 4, (rows, k), generator=gen)
    idx[0, -1] = -1
    return x, idx, torch.rand(rows, k, generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inline", [True, False])
def test_request_parts_are_the_bytes_of_pack_request(dtype, inline):
    """One frame format: the gathering send's parts and the packed tensors carry the same bytes."""
    x, idx, w = _rows(dtype=dtype)
    inline_bytes = p2p.INLINE_BYTES if inline else 0
    packed = [bytes(m.numpy()) for m in p2p.pack_request(5, 2, x, idx, w, 9, inline_bytes=inline_bytes)]
    parts = [_joined(m) for m in p2p.request_parts(5, 2, x, idx, w, 9, inline_bytes)]
    assert parts == packed and len(parts) == (1 if inline else 2)


def test_host_meta_and_rows_are_views_of_the_body():
    x, idx, w = _rows(rows=4, hidden=16)
    (frame,) = p2p.request_parts(1, 2, x, idx, w, 0, p2p.INLINE_BYTES)
    raw = np.frombuffer(bytearray(_joined(frame)), dtype=np.uint8)
    h = p2p.unpack_header(raw)
    body = raw[p2p.HEADER_BYTES:]
    ids, weights = p2p.host_meta(body, h)
    rows = p2p.host_rows(body, h)
    assert ids.tolist() == idx.tolist() and np.array_equal(weights, w.numpy()) and torch.equal(rows, x)
    assert np.shares_memory(ids, body) and np.shares_memory(weights, body)
    assert rows.data_ptr() == body.ctypes.data + h.rows * h.k * 8  # the rows are where they landed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reply_parts_round_trip_and_the_rows_outlive_the_buffer(dtype):
    y = torch.randn(3, 8).to(dtype)
    msg = np.frombuffer(bytearray(_joined(p2p.reply_parts(4, y, 0, 10, 20, 30))), dtype=np.uint8)
    packed = bytes(p2p.pack_reply(4, y, 0, 10, 20).numpy())
    assert msg[:32].tobytes() == packed[:32] and msg[40:].tobytes() == packed[40:]  # send_ns aside: the same bytes
    reply = p2p.host_reply(msg, 3, 8, dtype)
    assert (reply.msg_id, reply.status, reply.receive_ns, reply.compute_ns, reply.send_ns) == (4, 0, 10, 20, 30)
    msg[:] = 0  # the stream's buffer is reused by the next receive
    assert torch.equal(reply.rows, y) and reply.rows.dtype == dtype


def _stream_pair(staging_bytes: int) -> tuple[SocketPair, SocketPair]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname()[:2])
        peer, _ = server.accept()
    return SocketPair(client, 5.0), SocketPair(peer, 5.0, staging_bytes=staging_bytes)


def test_messages_written_together_are_handed_out_one_by_one_in_order(frame_loop):
    sender, receiver = _stream_pair(staging_bytes=256)
    sizes = [10, 100, 0, 50, 120, 7]  # more than the staging buffer holds at once: it is refilled from its front
    for i, n in enumerate(sizes):
        sender.send_parts([bytes([i]) * (n // 2), np.full(n - n // 2, i, dtype=np.uint8)])
    for i, n in enumerate(sizes):
        msg = receiver.recv_message(5.0, 200)
        assert msg.nbytes == n and (msg == i).all()


def test_a_message_larger_than_the_staging_buffer_arrives_whole(frame_loop):
    sender, receiver = _stream_pair(staging_bytes=64)
    big = np.arange(10_000, dtype=np.int32)
    sender.send_parts([b"head", big])
    sender.send_parts([b"next"])
    msg = receiver.recv_message(5.0, 1 << 20)
    assert msg[:4].tobytes() == b"head" and np.array_equal(msg[4:].view(np.int32), big)
    assert receiver.recv_message(5.0, 64).tobytes() == b"next"


def test_a_message_over_the_limit_ends_the_stream(frame_loop):
    sender, receiver = _stream_pair(staging_bytes=256)
    sender.send_parts([b"x" * 100])
    with pytest.raises(RuntimeError, match="a message of 100 bytes for a buffer of 99"):
        receiver.recv_message(5.0, 99)
    with pytest.raises(RuntimeError, match="closed"):  # the peer sees the stream end
        sender.recv_message(5.0, 10)


def test_a_receive_times_out_and_ends_the_stream(frame_loop):
    sender, receiver = _stream_pair(staging_bytes=256)
    with pytest.raises(RuntimeError, match="timed out"):
        receiver.recv_message(0.05, 10)
    with pytest.raises(RuntimeError, match="closed"):
        sender.recv_message(5.0, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inline", [True, False])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_send_request_writes_the_bytes_of_pack_request(frame_loop, dtype, inline, ids_dtype):
    """One frame format: the C send (ids narrowed in C) and the Python parts put pack_request's bytes on the wire."""
    x, idx, w = _rows(rows=5, hidden=16, k=3, dtype=dtype)
    inline_bytes = p2p.INLINE_BYTES if inline else 0
    packed = [bytes(m.numpy()) for m in p2p.pack_request(7, 2, x, idx, w, 9, inline_bytes=inline_bytes)]
    sender, receiver = _stream_pair(staging_bytes=4096)
    head = p2p.request_head(7, 2, x, 3, 9, inline_bytes)
    sender.send_request(head, idx.to(ids_dtype), w.t().contiguous().t(), x)  # weights not contiguous: converted
    got = [receiver.recv_message(5.0, 4096).tobytes() for _ in packed]
    assert got == packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_send_reply_writes_the_bytes_of_reply_parts(frame_loop, dtype):
    y = torch.randn(3, 8).to(dtype)
    sender, receiver = _stream_pair(staging_bytes=4096)
    sender.send_reply((4, 0, 10, 20, 30), y)
    msg, address = receiver.recv_frame(5.0, 4096)
    assert msg.tobytes() == _joined(p2p.reply_parts(4, y, 0, 10, 20, 30)) and address == msg.ctypes.data


def test_a_send_on_a_closed_pair_fails_cleanly(frame_loop):
    sender, receiver = _stream_pair(staging_bytes=256)
    sender.close()
    with pytest.raises(RuntimeError, match="send failed"):
        sender.send_reply((1, 0, 0, 0, 0), torch.zeros(2))
    with pytest.raises(RuntimeError, match="closed"):
        receiver.recv_message(5.0, 100)


# ---- the expert node's stream loop, over a scripted stream ---------------------
class _Script:
    """The scripted frames, written into a real stream (the C frame loop's or the Python path's, as
    ``frame_loop`` chose) that the node loop serves: ``pair`` is its end; ``replies()`` reads what came back."""

    def __init__(self, frames):
        self._sender, self.pair = _stream_pair(staging_bytes=1 << 16)
        self._frames = len(frames)
        for frame in frames:
            self._sender.send_parts([frame])

    def replies(self, n: int) -> list[np.ndarray]:
        return [self._sender.recv_message(5.0, 1 << 20).copy() for _ in range(n)]

    def nothing_came_back(self) -> bool:
        self.pair.close()  # the node's end: the sender then reads the stream's end, or a reply first
        with pytest.raises(RuntimeError, match="closed"):
            self._sender.recv_message(5.0, 1 << 20)
        return True


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    path = tiny_checkpoint(hidden_size=32, layers=2, experts=8, experts_per_token=2)
    cfg = ModelConfig.from_dir(path)
    layer = cfg.moe_layers[0]
    shard = load_expert_shard(str(path), cfg, {layer: [0, 1, 2, 3]}, progress=False)
    return DispatchService(shard, cfg), layer


def _session(svc) -> _Session:
    return _Session(svc, "127.0.0.1:1", "t/", "tcp", "127.0.0.1", 5.0, 5.0, 0)


def _frame(layer, x, idx, w, msg_id=0):
    (parts,) = p2p.request_parts(msg_id, layer, x, idx, w, 0, p2p.INLINE_BYTES)
    return _joined(parts)


def test_stream_loop_replies_with_the_shards_rows_and_zeros_where_nothing_is_hosted(service, frame_loop):
    svc, layer = service
    hidden = svc.cfg.hidden_size
    x = torch.randn(3, hidden)
    idx = torch.tensor([[0, 3], [2, -1], [1, 0]])
    w = torch.full((3, 2), 0.5)
    script = _Script([_frame(layer, x, idx, w, 1), _frame(layer, x, torch.full((3, 2), -1), w, 2),
                      bytes(p2p.control_frame(p2p.KIND_PING).numpy()), bytes(p2p.control_frame(p2p.KIND_BYE).numpy())])
    before = svc.tokens_computed
    _session(svc)._serve_stream(script.pair)
    first, second = (p2p.host_reply(r, 3, hidden, torch.float32) for r in script.replies(2))
    torch.testing.assert_close(first.rows, svc.shard.forward(layer, x, idx, w), rtol=1e-5, atol=1e-5)
    assert (first.msg_id, second.msg_id) == (1, 2) and torch.equal(second.rows, torch.zeros(3, hidden))
    assert svc.tokens_computed == before + 5  # routed ids of the first message; -1 is computed elsewhere


@pytest.mark.parametrize("case, error", [
    ("short", "a frame of .* bytes where its header says"),
    ("stub", "a frame of 10 bytes, shorter than the 64-byte header"),
    ("foreign", "experts \\[5\\] are not hosted on this node"),
    ("range", "expert ids must be in 0..7"),
    ("nan", "NaN or infinity"),
    ("layer", "layer 99 has no experts on this node"),
])
def test_stream_loop_names_what_is_wrong_with_a_bad_frame(service, case, error, frame_loop):
    svc, layer = service
    x, idx, w = torch.randn(2, svc.cfg.hidden_size), torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5)
    if case == "foreign":
        idx[1, 0] = 5
    if case == "range":
        idx[0, 0] = -7
    if case == "nan":
        w[1, 1] = float("nan")
    frame = _frame(99 if case == "layer" else layer, x, idx, w)
    script = _Script([frame[:-4] if case == "short" else frame[:10] if case == "stub" else frame])
    with pytest.raises(BadRequest, match=error):
        _session(svc)._serve_stream(script.pair)
    assert script.nothing_came_back()


@pytest.mark.parametrize("kind", ["ext", "ctypes"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_the_c_trim_counts_the_rows_with_work_as_numpy_does(dtype, kind, monkeypatch):
    from moemesh.attn_node.experts.remote_backend import rows_with_work

    use_frame_loop(kind, monkeypatch)
    lib = p2p_native.load()
    gen = torch.Generator().manual_seed(3)
    for rows in (1, 2, 7, 32):
        for _ in range(20):
            idx = torch.randint(-1, 4, (rows, 3), generator=gen).to(dtype)
            idx[torch.randint(0, rows, (1,), generator=gen).item():] = -1  # work first, then none
            assert lib.mm_rows_with_work(idx.data_ptr(), idx.element_size(), rows, 3) == rows_with_work(idx.numpy())
