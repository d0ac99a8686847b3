"""The ``tcp`` pair backend: p2p.py's frames over one plain TCP stream, for host tensors.

gloo's send and receive each cross to a thread of gloo's own and back (measured: ~0.5-1 ms per
decode-sized round trip on a loaded 2-core box, where a raw TCP echo of the same bytes is ~30 us).
This backend has the process-group calls the pair code uses (``send([t], dst, tag)`` and
``recv([t], src, tag)`` returning a work with ``wait(timeout)``), over a socket the calling thread
reads and writes itself: a send is ONE ``sendmsg`` of an 8-byte length and the tensor's memory
(gathered, no copy), done when it returns; a receive reads straight into the posted tensor
(``recv_into`` on its memory: no copy, no allocation) when its work is waited for. Frames and their
checks are p2p.py's, unchanged; as with gloo, a message shorter than the posted tensor lands in its
first bytes, and a longer one is an error.

Rendezvous: the expert node (rank 1) listens on an ephemeral port of the address toward its peer
(nothing wider) and publishes it in the pair's TCPStore prefix; the attention node connects and
sends the prefix (a 24-hex-digit secret it got from the Session call) before anything else; the
node accepts one connection that proves it and closes the listener. Tags are not sent: requests
only flow to the node and replies only back, in order, which is what the pair code relies on.
"""

from __future__ import annotations

import datetime
import hmac
import socket
import struct
import threading
import time

import torch

_LEN = struct.Struct("<q")  # little-endian int64, as the frames
HELLO_TIMEOUT_S = 5.0  # a connection that does not prove the secret by then is dropped (the real peer sends at once)


class SocketWork:
    """A receive posted into ``buf``; the read happens in ``wait`` (on the waiting thread: no hand-off)."""

    def __init__(self, pair: SocketPair, buf: torch.Tensor | None):
        self.pair, self.buf = pair, buf
        self._done = buf is None
        self.nbytes: int | None = None  # the message's length, once received

    def is_completed(self) -> bool:
        return self._done

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        if not self._done:
            self.nbytes = self.pair._read_into(self.buf, None if timeout is None else timeout.total_seconds())
            self._done = True
        return True


class SocketPair:
    """One connected stream of a pair; ``send``/``recv`` as a world-size-2 process group's (tags ignored).

    Sends and receives run on different threads (the attention node's engine sends, its reader receives), so
    each direction has its own socket object over the one connection (``dup``): a receive's timeout is never
    changed under a send. Both stay in timeout mode (never None), so the shared descriptor's flags never flip.
    """

    def __init__(self, sock: socket.socket, send_timeout_s: float = 30.0):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock  # receives
        self._out = sock.dup()  # sends
        self._out.settimeout(max(send_timeout_s, 0.001))  # a send waits only while the peer's window is full
        self._closed = False
        self._close_lock = threading.Lock()  # send, receive and fail() threads may all close

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> SocketWork:
        (t,) = tensors
        view = memoryview(t.numpy()).cast("B")  # the tensor's own bytes (contiguous uint8 frames)
        head = _LEN.pack(len(view))
        try:
            sent = self._out.sendmsg([head, view])  # one syscall: length and frame gathered, nothing copied
            if sent < len(head) + len(view):  # a full socket buffer (large bodies): the rest in order
                if sent < len(head):
                    self._out.sendall(head[sent:])
                    sent = len(head)
                self._out.sendall(view[sent - len(head):])
        except OSError as exc:
            self.close()
            raise RuntimeError(f"tcp pair send failed: {exc}") from exc
        return SocketWork(self, None)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> SocketWork:
        (t,) = tensors
        return SocketWork(self, t)

    def _read_into(self, buf: torch.Tensor, timeout_s: float | None) -> int:
        """Read the next message into ``buf``'s first bytes; its length."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else 3600.0)
        head = bytearray(_LEN.size)
        self._fill(memoryview(head), deadline)
        (n,) = _LEN.unpack(head)
        room = buf.numel() * buf.element_size()
        if not 0 <= n <= room:
            self.close()  # the stream is out of step: nothing after this can be trusted
            raise RuntimeError(f"tcp pair: a message of {n} bytes for a buffer of {room}")
        self._fill(memoryview(buf.numpy()).cast("B")[:n], deadline)
        return n

    def _fill(self, view: memoryview, deadline: float) -> None:
        got = 0
        while got < len(view):
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
                n = self.sock.recv_into(view[got:])
            except TimeoutError:
                self.close()  # a message half read cannot be resumed: the pair is done, as a gloo timeout ends it
                raise RuntimeError("tcp pair: timed out waiting for the peer") from None
            except OSError as exc:
                self.close()
                raise RuntimeError(f"tcp pair receive failed: {exc}") from exc
            if n == 0:
                self.close()
                raise RuntimeError("tcp pair: the peer closed the connection")
            got += n

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:  # wakes a thread blocked in recv_into/sendmsg before the descriptors go (no reuse under it)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._out.close()
        self.sock.close()

    def __del__(self):  # the pair code drops its groups by reference, as with gloo's
        self.close()


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
