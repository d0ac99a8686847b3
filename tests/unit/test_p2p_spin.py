"""The C receive's spin before it blocks (p2p_native.c spin_recv, p2p_native.spin_ns): what it counts and how it
backs off while spins do not pay."""

from __future__ import annotations

import socket
import threading

import pytest

from moemesh.wire import p2p_native
from moemesh.wire.p2p_socket import SocketPair


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


def test_a_message_that_is_there_is_caught_by_the_spin(two_cpus):
    sender, receiver = _pair(spin_us=50_000)
    sender.send_parts([b"hello"])
    assert receiver.recv_message(5.0, 64).tobytes() == b"hello"
    stats = receiver.spin_stats()
    assert stats["max_ns"] == 50_000_000 and (stats["caught"], stats["missed"], stats["skip"], stats["backoff"]) == (
        1, 0, 0, 1)


def test_a_spin_that_runs_out_is_followed_by_receives_that_block_at_once_then_twice_as_many(two_cpus):
    sender, receiver = _pair(spin_us=1_000)
    late = threading.Timer(0.05, sender.send_parts, args=([b"late"],))  # long after a 1 ms spin has run out
    late.start()
    assert receiver.recv_message(5.0, 64).tobytes() == b"late"  # the spin ran out; the blocking receive got it
    late.join()
    stats = receiver.spin_stats()
    assert stats["missed"] + stats["preempted"] >= 1 and (stats["skip"], stats["backoff"]) == (1, 2), stats
    sender.send_parts([b"a"])
    assert receiver.recv_message(5.0, 64).tobytes() == b"a"  # skipped: no spin, nothing caught
    assert _state(receiver)[0] == 0 and _state(receiver)[2] == stats["caught"]
    sender.send_parts([b"b"])  # after "a" was read: a receive of its own
    assert receiver.recv_message(5.0, 64).tobytes() == b"b"  # spins again, catches it: the backoff is reset
    assert _state(receiver) == (0, 1, stats["caught"] + 1)


def test_the_backoff_stops_doubling_at_its_cap(two_cpus):
    sender, receiver = _pair(spin_us=1_000)
    receiver._spin[2] = 1024  # the backoff after many spins that did not pay
    late = threading.Timer(0.05, sender.send_parts, args=([b"late"],))
    late.start()
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
