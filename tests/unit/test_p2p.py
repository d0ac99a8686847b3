"""moemesh/wire/p2p.py: the torch transport's frames, and the gloo behaviour they rely on.

Frames are pure; the group tests run two gloo pair groups in this process (one
per thread, each with its own store client, as the two nodes do).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from moemesh.wire import p2p, p2p_groups


def _rows(rows=3, hidden=8, k=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    idx = torch.randint(0, 16, (rows, k), generator=gen)
    idx[0, -1] = -1
    w = torch.rand(rows, k, generator=gen)
    return x, idx, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inline", [True, False])
def test_request_round_trip(dtype, inline):
    x, idx, w = _rows(dtype=dtype)
    messages = p2p.pack_request(7, 3, x, idx, w, 42, inline_bytes=1 << 20 if inline else 0)
    assert len(messages) == (1 if inline else 2)
    h = p2p.unpack_header(messages[0])
    assert (h.kind, h.msg_id, h.layer, h.rows, h.k, h.version, h.dtype, h.hidden) == (
        p2p.KIND_INLINE if inline else p2p.KIND_DISPATCH, 7, 3, 3, 2, 42, dtype, 8)
    body = messages[0][p2p.HEADER_BYTES:] if inline else messages[1]
    assert body.numel() == h.body_bytes
    got_x, got_idx, got_w = p2p.unpack_body(body, h)
    assert torch.equal(got_x, x) and got_x.dtype == dtype
    assert got_idx.tolist() == idx.tolist() and got_w.tolist() == w.tolist()


def test_body_tensors_are_the_body_on_its_device():
    x, idx, w = _rows(dtype=torch.bfloat16)
    frame, body = p2p.pack_request(1, 2, x, idx, w, 0)
    h = p2p.unpack_header(frame)
    got_x, got_idx, got_w = p2p.body_tensors(body, h)
    assert got_x.data_ptr() == body.data_ptr() + h.rows * h.k * 8  # the rows are a view: no copy
    assert torch.equal(got_x, x) and got_idx.dtype == torch.int32 and got_w.dtype == torch.float32
    assert got_idx.tolist() == idx.tolist() and torch.equal(got_w, w)
    assert got_idx.is_contiguous() and got_w.is_contiguous()


def test_inline_only_up_to_the_limit_and_the_body_is_a_copy():
    x, idx, w = _rows(rows=4, hidden=16)
    body_bytes = 4 * 2 * 8 + x.numel() * 4
    assert len(p2p.pack_request(0, 1, x, idx, w, 0, inline_bytes=body_bytes)) == 1
    messages = p2p.pack_request(0, 1, x, idx, w, 0, inline_bytes=body_bytes - 1)
    assert len(messages) == 2 and messages[0].numel() == p2p.HEADER_BYTES
    x.zero_()  # the caller may reuse its tensors once sent
    got, _, _ = p2p.unpack_body(messages[1], p2p.unpack_header(messages[0]))
    assert got.abs().sum() > 0


def test_control_frames_and_unknown_dtypes():
    for kind in (p2p.KIND_PING, p2p.KIND_BYE):
        h = p2p.unpack_header(p2p.control_frame(kind))
        assert h.kind == kind and h.dtype is None
    frame = torch.tensor([p2p.KIND_DISPATCH, 0, 1, 1, 1, 0, 99, 8], dtype=torch.int64).view(torch.uint8)
    assert p2p.unpack_header(frame).dtype is None  # the expert node rejects it by name


def test_reply_round_trip():
    y = torch.randn(5, 8).to(torch.bfloat16)
    buf = p2p.pack_reply(11, y, receive_ns=7, compute_ns=1234)
    assert buf.numel() == p2p.reply_bytes(5, 8, torch.bfloat16)
    reply = p2p.unpack_reply(buf, 5, 8, torch.bfloat16)
    assert (reply.msg_id, reply.status, reply.receive_ns, reply.compute_ns, reply.send_ns) == (11, 0, 7, 1234, 0)
    assert torch.equal(reply.rows, y)


def test_reply_send_ns_counts_from_started():
    started = time.monotonic_ns()
    reply = p2p.unpack_reply(p2p.pack_reply(3, torch.ones(2, 4), started_ns=started), 2, 4, torch.float32)
    assert 0 < reply.send_ns <= time.monotonic_ns() - started


def test_backend_for_device():
    assert p2p.backend_for("cpu") == "tcp"
    assert p2p.backend_for(torch.device("cuda", 0)) == "nccl"


def test_local_host_toward_loopback():
    assert p2p_groups.local_host_toward("127.0.0.1") == "127.0.0.1"


# ---- gloo and tcp, two groups in this process ---------------------------------
def _join_pair(backend: str, prefix: str = "t/") -> dict[int, tuple]:
    store = p2p_groups.host_store(0)
    address = f"127.0.0.1:{store.port}"
    groups: dict[int, tuple] = {}

    def join(rank):
        groups[rank] = p2p_groups.new_pair_group(p2p_groups.connect_store(address, 10), prefix, rank, backend, 10, "127.0.0.1")

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(groups) == {0, 1}
    return groups


@pytest.fixture(params=["gloo", "tcp"])
def any_pair(request):
    groups = _join_pair(request.param)
    yield groups[0][0], groups[1][0]


@pytest.fixture
def pair():
    store = p2p_groups.host_store(0)
    address = f"127.0.0.1:{store.port}"
    groups: dict[int, tuple] = {}

    def join(rank):
        groups[rank] = p2p_groups.new_pair_group(p2p_groups.connect_store(address, 10), "t/", rank, "gloo", 10, "127.0.0.1")

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(groups) == {0, 1}
    yield groups[0][0], groups[1][0]


def test_a_shorter_message_lands_in_a_longer_receive(any_pair):
    """The frame protocol posts one receive of 64 + inline_bytes for frames of any size up to that."""
    attn, expert = any_pair
    x, idx, w = _rows()
    (frame,) = p2p.pack_request(1, 2, x, idx, w, 0, inline_bytes=p2p.INLINE_BYTES)
    buf = torch.zeros(p2p.HEADER_BYTES + p2p.INLINE_BYTES, dtype=torch.uint8)
    recv = expert.recv([buf], p2p.ATTN_RANK, p2p.TAG_REQUEST)
    send = attn.send([frame], p2p.EXPERT_RANK, p2p.TAG_REQUEST)
    p2p_groups.wait(recv, 10)
    p2p_groups.wait(send, 10)
    h = p2p.unpack_header(buf)
    got, _, _ = p2p.unpack_body(buf[p2p.HEADER_BYTES:], h)
    assert torch.equal(got, x)


def test_a_timed_out_wait_is_the_end_of_the_group(pair):
    """Why every timeout fails the pair for good instead of retrying: gloo closes the connection."""
    attn, expert = pair
    buf = torch.zeros(p2p.HEADER_BYTES, dtype=torch.uint8)
    with pytest.raises(p2p.P2PError, match="reply"):
        p2p_groups.wait(attn.recv([buf], p2p.EXPERT_RANK, p2p.TAG_REPLY), 0.2, what="waiting for a reply")
    # The peer's next operation fails: refused at once ("closed") once it has seen the connection close, or,
    # on a loaded machine where it has not noticed yet, by its own timeout. Either way the pair is over.
    with pytest.raises(RuntimeError, match="closed|Timed out"):
        p2p_groups.wait(expert.send([p2p.control_frame(p2p.KIND_PING)], p2p.ATTN_RANK, p2p.TAG_REPLY), 5)


def test_tcp_frames_and_replies_round_trip_in_order():
    attn, expert = _tcp_pair()
    x, idx, w = _rows()
    sends = [p2p.pack_request(i, 2, x, idx, w, 0, inline_bytes=p2p.INLINE_BYTES)[0] for i in range(3)]
    for frame in sends:
        p2p_groups.wait(attn.send([frame], p2p.EXPERT_RANK, p2p.TAG_REQUEST), 5, "tcp")
    buf = torch.zeros(p2p.HEADER_BYTES + p2p.INLINE_BYTES, dtype=torch.uint8)
    for i in range(3):  # written before anyone read: they wait in the stream, in order
        p2p_groups.wait(expert.recv([buf], p2p.ATTN_RANK, p2p.TAG_REQUEST), 5, "tcp")
        h = p2p.unpack_header(buf.numpy())
        got, gidx, gw, ids, weights = p2p.host_body(buf.numpy()[p2p.HEADER_BYTES:], h)
        assert h.msg_id == i and torch.equal(got, x) and torch.equal(gidx, idx.int()) and torch.equal(gw, w)
        reply = p2p.pack_reply(i, got * 2, receive_ns=5)
        p2p_groups.wait(expert.send([reply], p2p.ATTN_RANK, p2p.TAG_REPLY), 5, "tcp")
    for i in range(3):
        rbuf = torch.empty(p2p.reply_bytes(*x.shape, x.dtype), dtype=torch.uint8)
        p2p_groups.wait(attn.recv([rbuf], p2p.EXPERT_RANK, p2p.TAG_REPLY), 5, "tcp")
        r = p2p.unpack_reply(rbuf, *x.shape, x.dtype)
        assert (r.msg_id, r.receive_ns) == (i, 5) and torch.equal(r.rows, x * 2)


def test_tcp_message_longer_than_the_receive_ends_the_pair():
    attn, expert = _tcp_pair()
    p2p_groups.wait(attn.send([torch.zeros(100, dtype=torch.uint8)], 1), 5, "tcp")
    with pytest.raises(p2p.P2PError, match="100 bytes for a buffer of 64"):
        p2p_groups.wait(expert.recv([torch.zeros(64, dtype=torch.uint8)], 0), 5, "tcp", "waiting for a frame")
    with pytest.raises(p2p.P2PError, match="closed"):  # the peer sees the stream end
        p2p_groups.wait(attn.recv([torch.zeros(64, dtype=torch.uint8)], 1), 5, "tcp")


def test_tcp_timed_out_wait_ends_the_pair_and_the_peer_sees_it():
    attn, expert = _tcp_pair()
    with pytest.raises(p2p.P2PError, match="waiting for a reply: tcp pair: timed out"):
        p2p_groups.wait(attn.recv([torch.zeros(64, dtype=torch.uint8)], 1), 0.2, "tcp", "waiting for a reply")
    with pytest.raises(p2p.P2PError, match="closed"):
        p2p_groups.wait(expert.recv([torch.zeros(64, dtype=torch.uint8)], 0), 5, "tcp")


def test_tcp_listener_refuses_a_peer_without_the_secret():
    store = p2p_groups.host_store(0)
    address = f"127.0.0.1:{store.port}"
    got: dict = {}
    t = threading.Thread(target=lambda: got.setdefault("pair", p2p_groups.new_pair_group(
        p2p_groups.connect_store(address, 10), "s-secret/", 1, "tcp", 10, "127.0.0.1")))
    t.start()
    client = p2p_groups.connect_store(address, 10)
    client.wait(["s-secret/tcp/addr"])
    host, _, port = client.get("s-secret/tcp/addr").decode().rpartition("|")
    import socket

    with socket.create_connection((host, int(port))) as intruder:
        intruder.sendall(b"s-guessd/")  # as long as the secret, but not it: dropped, the listener waits on
        try:
            assert intruder.recv(1) == b""
        except ConnectionResetError:
            pass
    real = p2p_groups.new_pair_group(client, "s-secret/", 0, "tcp", 10, "127.0.0.1")
    t.join(10)
    assert "pair" in got and real is not None


def _tcp_pair():
    groups = _join_pair("tcp")
    return groups[0][0], groups[1][0]


def test_rendezvous_without_a_peer_times_out():
    store = p2p_groups.host_store(0)
    with pytest.raises(p2p.P2PError, match="rendezvous"):
        p2p_groups.new_pair_group(p2p_groups.connect_store(f"127.0.0.1:{store.port}", 1), "lonely/", 0, "gloo", 0.5, "127.0.0.1")


def test_unreachable_store_is_a_p2p_error():
    with pytest.raises(p2p.P2PError, match="rendezvous store"):
        p2p_groups.connect_store("127.0.0.1:1", 0.5)


def test_tcp_listener_drops_a_silent_connection_and_accepts_the_real_peer(monkeypatch):
    """A connection that never sends the secret (a port scanner) is dropped after HELLO_TIMEOUT_S, not held
    until the pair's deadline with the real peer left waiting."""
    import socket

    monkeypatch.setattr(p2p_groups, "HELLO_TIMEOUT_S", 0.2)
    store = p2p_groups.host_store(0)
    address = f"127.0.0.1:{store.port}"
    got: dict = {}
    t = threading.Thread(target=lambda: got.setdefault("pair", p2p_groups.new_pair_group(
        p2p_groups.connect_store(address, 10), "s-silent/", 1, "tcp", 30, "127.0.0.1")))
    t.start()
    client = p2p_groups.connect_store(address, 10)
    client.wait(["s-silent/tcp/addr"])
    host, _, port = client.get("s-silent/tcp/addr").decode().rpartition("|")
    with socket.create_connection((host, int(port))):  # connects first, says nothing, stays open
        real = p2p_groups.new_pair_group(client, "s-silent/", 0, "tcp", 30, "127.0.0.1")
        t.join(30)
    assert "pair" in got and real is not None


def test_tcp_receive_reports_the_message_length():
    """A reply shorter than its buffer must not pass for a whole one: the receive says what arrived."""
    attn, expert = _tcp_pair()
    p2p_groups.wait(expert.send([torch.ones(24, dtype=torch.uint8)], 0), 5, "tcp")
    work = attn.recv([torch.zeros(64, dtype=torch.uint8)], 1)
    p2p_groups.wait(work, 5, "tcp")
    assert work.nbytes == 24
