"""SocketPair.close() while a call is in flight on its descriptors (moemesh/wire/p2p_socket.py): the stream is
shut down at once, and the descriptors stay open until that call has returned, so their numbers cannot be
reused under it."""

from __future__ import annotations

import errno
import socket
import struct
import threading

import pytest

from moemesh.wire import p2p_native
from moemesh.wire.p2p_socket import SocketPair
from moemesh.wire.p2p_socket_ends import RECV, SEND
from tests.helpers import eventually
from tests.unit.test_p2p_stream import FRAME_LOOPS, use_frame_loop


def _pair() -> tuple[SocketPair, SocketPair]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname()[:2])
        peer, _ = server.accept()
    return SocketPair(client, 5.0), SocketPair(peer, 5.0)


class _HeldReceive:
    """The C library with ``mm_recv`` held in flight: it reads the descriptor's number from its argument block,
    as the C loop does, says it is in, then waits for ``go`` before it returns (the descriptor's state then)."""

    def __init__(self, lib):
        self._lib = lib
        self.inside, self.go = threading.Event(), threading.Event()
        self.fd_open_after_close: bool | None = None

    def __getattr__(self, name):
        return getattr(self._lib, name)

    def mm_recv(self, args_address: int) -> int:
        import ctypes

        (fd,) = struct.unpack("<q", ctypes.string_at(args_address + 16, 8))
        self.inside.set()
        self.go.wait(5.0)
        try:
            socket.socket(fileno=fd).detach()  # raises when the number is no longer an open socket
            self.fd_open_after_close = True
        except OSError:
            self.fd_open_after_close = False
        return p2p_native.ERR_CLOSED


def test_close_keeps_the_descriptors_of_a_call_in_flight_open_until_it_returns():
    lib = p2p_native.load()
    if lib is None:
        pytest.skip("no C compiler here: the C frame loop cannot be built")
    _, receiver = _pair()
    held = receiver.native = _HeldReceive(lib)
    errors = []

    def receive():
        try:
            receiver.recv_message(5.0, 64)
        except RuntimeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=receive)
    thread.start()
    assert held.inside.wait(5.0)
    receiver.close()  # while the receive is in flight
    assert receiver.sock.fileno() != -1  # shut down, not closed
    held.go.set()
    thread.join(5.0)
    assert held.fd_open_after_close is True and errors == ["tcp pair: the peer closed the connection"]
    assert receiver.sock.fileno() == -1 and receiver._out.fileno() == -1  # the call's return closed them


@pytest.mark.parametrize("frame_loop", FRAME_LOOPS)
def test_close_without_a_call_in_flight_closes_at_once_and_later_calls_fail_cleanly(frame_loop, monkeypatch):
    use_frame_loop(frame_loop, monkeypatch)
    sender, receiver = _pair()
    receiver.close()
    assert receiver.sock.fileno() == -1 and receiver._out.fileno() == -1
    with pytest.raises(RuntimeError, match="receive failed|closed"):
        receiver.recv_message(1.0, 64)
    with pytest.raises(RuntimeError, match="closed"):  # the peer sees the end
        sender.recv_message(5.0, 64)


def test_close_wakes_a_blocked_receive_of_the_python_path(monkeypatch):
    monkeypatch.setattr(p2p_native, "load", lambda: None)
    _, receiver = _pair()
    errors = []
    thread = threading.Thread(target=lambda: errors.append(_error(receiver)))
    thread.start()
    eventually(lambda: receiver._busy[RECV], what="the receive in recv_into")  # held until it returns
    receiver.close()
    thread.join(5.0)
    assert not thread.is_alive() and "closed" in errors[0] and receiver.sock.fileno() == -1


def _error(pair: SocketPair) -> str:
    try:
        pair.recv_message(5.0, 64)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_a_native_call_reached_after_close_never_runs_on_the_descriptor_it_was_given():
    """A call that read its descriptor before close() (an argument, or a grown send scratch writing it back)
    reaches the flag after it: it answers EBADF (as on a closed descriptor), and the C function never sees the number."""
    if p2p_native.load() is None:
        pytest.skip("no C compiler here: the C frame loop cannot be built")
    sender, receiver = _pair()
    fd, calls = receiver._rfd, []
    receiver.close()  # another thread, between the caller's read of the number and its call
    assert receiver._held(RECV, -errno.EBADF, lambda *args: calls.append(args) or 0, fd) == -errno.EBADF
    assert sender._held(SEND, -errno.EBADF, lambda *args: calls.append(args) or 0, fd) == 0  # open: the call runs
    assert receiver._held(SEND, None, lambda *args: calls.append(args) or 7, fd) == 7  # no refusal: the Python path's
    assert calls == [(fd,), (fd,)]
