"""Pair groups of the torch transport: the rendezvous and the waits (moemesh/wire/p2p.py says what the groups
carry; p2p_socket.py is the ``tcp`` backend's stream).

The expert node hosts a ``TCPStore`` (:func:`host_store`); each pair rendezvouses under a key prefix of its own
there (:func:`new_pair_group`): gloo and NCCL through their process groups, the ``tcp`` backend through
:func:`listen_pair` / :func:`connect_pair`: the expert node (rank 1) listens on an ephemeral port of the
address toward its peer (nothing wider) and publishes it under the prefix; the attention node connects and
sends the prefix (a 24-hex-digit secret it got from the Session call) before anything else; the node accepts
one connection that proves it and closes the listener.
"""

from __future__ import annotations

import datetime
import hmac
import socket
import time

import torch
import torch.distributed as dist

from moemesh.wire.p2p import EXPERT_RANK, HOST_BACKENDS, P2PError
from moemesh.wire.p2p_socket import SocketPair

HELLO_TIMEOUT_S = 5.0  # a connection that does not prove the secret by then is dropped (the real peer sends at once)


def host_store(port: int = 0, timeout_s: float = 30.0) -> dist.TCPStore:
    """The expert node's rendezvous store (a TCPStore server on ``port``; 0 picks one: ``.port``)."""
    return dist.TCPStore("0.0.0.0", port, None, True, datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def connect_store(address: str, timeout_s: float) -> dist.TCPStore:
    host, _, port = address.rpartition(":")
    try:
        return dist.TCPStore(host.strip("[]"), int(port), None, False, datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # DistNetworkError, ValueError
        raise P2PError(f"cannot reach the rendezvous store {address}: {exc}") from exc


def local_host_toward(host: str) -> str:
    """This machine's address on the route to ``host`` (what a gloo device must bind so the peer reaches it)."""
    host = host.strip("[]")
    family, _, _, _, sockaddr = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)  # UDP: picks the route, sends nothing
        return s.getsockname()[0]


def new_pair_group(store, prefix: str, rank: int, backend: str, timeout_s: float, hostname: str,
                   device: torch.device | None = None) -> tuple:
    """(request group, reply group) of a world-size-2 group under ``prefix``; the same object twice for gloo.

    Blocks until the peer joins (at most ``timeout_s``)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if backend == "tcp":
            pair = (listen_pair(store, prefix, hostname, timeout_s) if rank == EXPERT_RANK
                    else connect_pair(store, prefix, timeout_s))
            return pair, pair
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=hostname)]
            opts._threads = 1  # collectives only; send/recv do not use these threads
            pg = dist.ProcessGroupGloo(dist.PrefixStore(f"{prefix}pg/", store), rank, 2, opts)
            return pg, pg
        if backend == "nccl":  # pragma: no cover - needs CUDA
            if not dist.is_nccl_available() or device is None or device.type != "cuda":
                raise P2PError("the nccl backend needs a CUDA build of torch and a CUDA device")
            torch.cuda.set_device(device)
            groups = []
            for direction in ("req", "rep"):
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = timeout
                groups.append(dist.ProcessGroupNCCL(dist.PrefixStore(f"{prefix}{direction}/", store), rank, 2, opts))
            return groups[0], groups[1]
        raise P2PError(f"unknown torch.distributed backend {backend!r} (tcp, gloo or nccl)")
    except P2PError:
        raise
    except Exception as exc:  # DistStoreError, gloo's RuntimeError: one type for callers
        raise P2PError(f"rendezvous under {prefix!r} failed: {exc}") from exc


def wait(work, timeout_s: float, backend: str = "gloo", what: str = "p2p operation") -> None:
    """Wait for one send/recv at most ``timeout_s``; P2PError (the group is then unusable) otherwise."""
    timeout_s = max(timeout_s, 0.001)
    try:
        if backend in HOST_BACKENDS:
            work.wait(datetime.timedelta(seconds=timeout_s))
            return
        deadline = time.monotonic() + timeout_s  # NCCL: wait() would only make the stream wait
        spins = 0
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:g}s")
            spins += 1
            time.sleep(0 if spins < 1000 else 50e-6)
        work.wait()  # raises the operation's own error, if it had one
    except Exception as exc:
        raise P2PError(f"{what}: {exc}") from exc


# ---- the tcp backend's rendezvous ------------------------------------------
def listen_pair(store, prefix: str, hostname: str, timeout_s: float) -> SocketPair:
    """Rank 1 (the expert node): listen toward the peer, publish the port, accept the one peer that proves
    ``prefix``."""
    with socket.create_server((hostname, 0)) as server:
        host, port = server.getsockname()[:2]
        store.set(f"{prefix}tcp/addr", f"{host}|{port}")
        deadline = time.monotonic() + timeout_s
        secret = prefix.encode()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no peer connected within {timeout_s:g}s")
            server.settimeout(left)
            sock, _ = server.accept()
            # Bounded per connection: one that connects and stays silent cannot hold the real peer out.
            sock.settimeout(max(0.001, min(HELLO_TIMEOUT_S, deadline - time.monotonic())))
            try:
                hello = _read_exact(sock, len(secret))
            except OSError:
                sock.close()
                continue
            if hmac.compare_digest(hello, secret):
                return SocketPair(sock, timeout_s)
            sock.close()  # not our peer: keep waiting for it


def connect_pair(store, prefix: str, timeout_s: float) -> SocketPair:
    """Rank 0 (the attention node): find the node's port in the store, connect, prove ``prefix``."""
    store.wait([f"{prefix}tcp/addr"], datetime.timedelta(seconds=timeout_s))
    host, _, port = store.get(f"{prefix}tcp/addr").decode().rpartition("|")
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    sock.sendall(prefix.encode())
    return SocketPair(sock, timeout_s)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data
