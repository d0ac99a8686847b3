"""The C receive's spin before it blocks (p2p_native.c spin_recv, p2p_native.spin_ns): what it counts and how it
backs off while spins do not pay."""

from __future__ import annotations

import socket
import threading

import pytest

from moemesh.wire import p2p_native
from moemesh.wire.p2p_socket import SocketPair
from tests.helpers import eventually


@pytest.fixture(autouse=True)
def native():
    if p2p_native.load() is None:
        pytest.skip("no C compiler here: the C frame loop (and its spin) cannot be built")


def _pair(spin_us: float) -> tuple[SocketPair, SocketPair]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname()[:2])
        peer, _ = server.accept()
    return SocketPair(client, 5.0), SocketPair(peer, 5.0, spin_us=spin_us)


def _state(pair: SocketPair) -> tuple[int, int, int]:
    s = pair.spin_stats()
    return s["skip"], s["backoff"], s["caught"]


@pytest.fixture
def two_cpus(monkeypatch):
    monkeypatch.setattr(p2p_native.os, "sched_getaffinity", lambda pid: {0, 1})


NEVER_PREEMPTED = 3600 * 10**9  # preempt_ns for a test whose spin must catch what is there, however loaded the box


def _catching(pair: SocketPair) -> None:
    """A spin long enough to catch a message already sent (it ends when the message is there), never judged
    preempted: what it does with a message that is there does not depend on the box's load."""
    pair._spin[0], pair._spin[6] = 5 * 10**9, NEVER_PREEMPTED


def _send_once_a_spin_ran_out(sender: SocketPair, receiver: SocketPair, payload: bytes) -> threading.Thread:
    """Send ``payload`` only after the receiver's spin has counted a miss (it is blocking by then): however the
    threads are scheduled, that spin cannot have caught it."""
    missed = receiver.spin_stats()["missed"]

    def send() -> None:
        eventually(lambda: receiver.spin_stats()["missed"] > missed, 10.0, "the receiver's spin ran out")
        sender.send_parts([payload])

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_a_message_that_is_there_is_caught_by_the_spin(two_cpus):
    sender, receiver = _pair(spin_us=100)
    _catching(receiver)
    sender.send_parts([b"hello"])
    assert receiver.recv_message(5.0, 64).tobytes() == b"hello"
    stats = receiver.spin_stats()
    assert (stats["caught"], stats["missed"], stats["skip"], stats["backoff"]) == (1, 0, 0, 1)


def test_a_spin_that_runs_out_is_followed_by_receives_that_block_at_once_then_twice_as_many(two_cpus):
    sender, receiver = _pair(spin_us=1_000)
    late = _send_once_a_spin_ran_out(sender, receiver, b"late")
    assert receiver.recv_message(5.0, 64).tobytes() == b"late"  # the spin ran out; the blocking receive got it
    late.join()
    stats = receiver.spin_stats()
    assert (stats["missed"], stats["caught"], stats["skip"], stats["backoff"]) == (1, 0, 1, 2), stats
    _catching(receiver)
    sender.send_parts([b"a"])
    assert receiver.recv_message(5.0, 64).tobytes() == b"a"  # skipped: no spin, nothing caught
    assert _state(receiver) == (0, 2, 0)
    sender.send_parts([b"b"])  # after "a" was read: a receive of its own
    assert receiver.recv_message(5.0, 64).tobytes() == b"b"  # spins again, catches it: the backoff is reset
    assert _state(receiver) == (0, 1, 1)


def test_the_backoff_stops_doubling_at_its_cap(two_cpus):
    sender, receiver = _pair(spin_us=1_000)
    receiver._spin[2] = 1024  # the backoff after many spins that did not pay
    late = _send_once_a_spin_ran_out(sender, receiver, b"late")
    receiver.recv_message(5.0, 64)
    late.join()
    assert _state(receiver)[:2] == (1024, 1024)


def test_no_spin_when_switched_off_or_on_one_cpu(two_cpus, monkeypatch):
    sender, receiver = _pair(spin_us=0)
    sender.send_parts([b"x"])
    receiver.recv_message(5.0, 64)
    assert receiver.spin_stats()["caught"] == 0
    monkeypatch.setattr(p2p_native.os, "sched_getaffinity", lambda pid: {0})  # the peer may share our one CPU
    assert p2p_native.spin_ns(100) == 0


def test_the_spin_comes_from_the_environment_and_a_bad_value_is_named(two_cpus, monkeypatch):
    monkeypatch.delenv("MOEMESH_P2P_SPIN_US", raising=False)
    assert p2p_native.spin_ns() == int(p2p_native.SPIN_US * 1000)
    monkeypatch.setenv("MOEMESH_P2P_SPIN_US", "25")
    assert p2p_native.spin_ns() == 25_000
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv("MOEMESH_P2P_SPIN_US", bad)
        with pytest.raises(ValueError, match="MOEMESH_P2P_SPIN_US=.*microseconds >= 0"):
            p2p_native.spin_ns()


def test_the_python_path_has_no_spin(monkeypatch):
    monkeypatch.setattr(p2p_native, "load", lambda: None)
    _, receiver = _pair(spin_us=100)
    assert receiver.spin_stats() == {}


def test_a_bad_spin_setting_is_named_and_the_socket_it_was_given_is_closed(monkeypatch):
    """``MOEMESH_P2P_SPIN_US`` is read when a pair is made: a bad value raises there, and the socket the pair was to
    own is closed at once (the peer sees the end), not left to the garbage collector."""
    monkeypatch.setenv("MOEMESH_P2P_SPIN_US", "fast")
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname()[:2])
        peer, _ = server.accept()
    with pytest.raises(ValueError, match="MOEMESH_P2P_SPIN_US='fast'"):
        SocketPair(peer, 5.0)
    assert peer.fileno() == -1
    client.settimeout(5.0)
    assert client.recv(1) == b""  # closed: the peer's read ends
    client.close()
