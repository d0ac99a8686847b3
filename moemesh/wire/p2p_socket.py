"""The ``tcp`` pair backend: p2p.py's frames over one plain TCP stream, for host tensors.

gloo's send and receive each cross to a thread of gloo's own and back (measured: ~0.5-1 ms per
decode-sized round trip on a loaded 2-core box, where a raw TCP echo of the same bytes is ~30 us).
This backend has the process-group calls the pair code uses (``send([t], dst, tag)`` and
``recv([t], src, tag)`` returning a work with ``wait(timeout)``), over a socket the calling thread
reads and writes itself, and a leaner pair of calls for the hot path (:meth:`SocketPair.send_parts`,
:meth:`SocketPair.recv_message`): no work objects, no tensor per message.

Wire: each message is an 8-byte little-endian length and the message's bytes. A send is ONE
``sendmsg`` of the length and the message's parts (gathered from their own memory, no copy, no
concat), done when it returns. Receives go through one staging buffer per pair: one ``recv_into``
takes whatever the kernel holds (the length and the message, often the next message too), and a
message is handed out as a view of that buffer (valid until the next receive), so a decode-sized
message costs one system call and no allocation. A message larger than the buffer is read into a
buffer of its own, straight from the socket. ``recv`` (the process-group call) copies the message into
the posted tensor; as with gloo, a message shorter than the posted tensor lands in its first bytes,
and a longer one is an error.

Timeouts are the kernel's (``SO_RCVTIMEO``/``SO_SNDTIMEO``) on a blocking socket: Python's own socket
timeouts cost a ``poll`` before every read and an ``ioctl`` for every change of timeout. The receive
timeout is set again only when a wait asks for less than it, or for much more (a wait may last up
to 10% longer than asked; every wait that ends that way ends the pair, as a gloo timeout does).

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

import numpy as np
import torch

_LEN = struct.Struct("<q")  # little-endian int64, as the frames
HELLO_TIMEOUT_S = 5.0  # a connection that does not prove the secret by then is dropped (the real peer sends at once)
STAGING_BYTES = 1 << 20  # the receive buffer: a decode step's message (and the next ones) lands here whole
_TIMEOUT_SLACK = 1.1  # the kernel's receive timeout is reset only when it is off by more than this factor


def _timeval(seconds: float) -> bytes:
    seconds = max(seconds, 0.001)
    return struct.pack("@ll", int(seconds), int((seconds % 1.0) * 1e6))


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


_SENT = SocketWork(None, None)  # every send is complete when it returns: one shared, done work


class SocketPair:
    """One connected stream of a pair; ``send``/``recv`` as a world-size-2 process group's (tags ignored).

    Sends and receives run on different threads (the attention node's engine sends, a waiter receives), so each
    direction has its own socket object over the one connection (``dup``); both are blocking (the same file
    flags), bounded by the kernel's per-direction timeouts. One thread receives at a time (the callers' order).
    """

    def __init__(self, sock: socket.socket, send_timeout_s: float = 30.0, staging_bytes: int = STAGING_BYTES):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send_timeout_s))
        self.sock = sock  # receives
        self._out = sock.dup()  # sends
        self._rcvtimeo = -1.0  # what SO_RCVTIMEO is set to (none yet)
        self._staging = np.empty(staging_bytes, dtype=np.uint8)
        self._view = memoryview(self._staging)
        self._start = self._end = 0  # the received bytes not handed out yet: _staging[_start:_end]
        self._closed = False
        self._close_lock = threading.Lock()  # send, receive and fail() threads may all close

    # ---- sends ------------------------------------------------------------
    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> SocketWork:
        (t,) = tensors
        self.send_parts([t.numpy()])  # the tensor's own bytes (contiguous uint8 frames)
        return _SENT

    def send_parts(self, parts: list) -> None:
        """One message of ``parts`` (contiguous buffers: bytes, numpy arrays) in one ``sendmsg``, nothing copied.

        RuntimeError (the pair closed) when it cannot be sent whole."""
        views = [memoryview(p).cast("B") for p in parts]
        total = sum(v.nbytes for v in views)
        views.insert(0, memoryview(_LEN.pack(total)))
        try:
            sent = self._out.sendmsg(views)
            if sent < total + _LEN.size:  # a full socket buffer (large bodies): the rest in order
                for v in views:
                    if sent >= v.nbytes:
                        sent -= v.nbytes
                        continue
                    self._out.sendall(v[sent:])
                    sent = 0
        except OSError as exc:  # a timeout (the peer's window stayed full) included
            self.close()
            raise RuntimeError(f"tcp pair send failed: {exc}") from exc

    # ---- receives ---------------------------------------------------------
    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> SocketWork:
        (t,) = tensors
        return SocketWork(self, t)

    def _read_into(self, buf: torch.Tensor, timeout_s: float | None) -> int:
        """Read the next message into ``buf``'s first bytes; its length."""
        room = buf.numel() * buf.element_size()
        msg = self.recv_message(timeout_s, room)
        buf.numpy().reshape(-1).view(np.uint8)[: msg.nbytes] = msg
        return msg.nbytes

    def recv_message(self, timeout_s: float | None, limit: int) -> np.ndarray:
        """The next message (at most ``limit`` bytes) as a uint8 view, valid until the next receive of this pair.

        RuntimeError (the pair closed) on a timeout, a closed stream or a message over ``limit``."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else 3600.0)
        if self._end - self._start < _LEN.size:
            self._fill(_LEN.size, deadline)
        (n,) = _LEN.unpack_from(self._staging, self._start)
        if not 0 <= n <= limit:
            self.close()  # the stream is out of step: nothing after this can be trusted
            raise RuntimeError(f"tcp pair: a message of {n} bytes for a buffer of {limit}")
        begin = self._start + _LEN.size
        if begin + n <= self._end:  # already here (the common case: it came with its length)
            self._start = begin + n
            return self._staging[begin:begin + n]
        if _LEN.size + n > self._staging.nbytes:
            return self._read_large(n, deadline)
        self._fill(_LEN.size + n, deadline)
        begin = self._start + _LEN.size
        self._start = begin + n
        return self._staging[begin:begin + n]

    def _fill(self, need: int, deadline: float) -> None:
        """Receive until the staging buffer holds ``need`` bytes from ``_start`` (moved to its front when the
        rest would not fit: what was handed out before is done with, by the caller's contract)."""
        if self._start + need > self._staging.nbytes:
            held = self._end - self._start
            self._staging[:held] = self._staging[self._start:self._end]
            self._start, self._end = 0, held
        while self._end - self._start < need:
            self._end += self._recv_some(self._view[self._end:], deadline)

    def _read_large(self, n: int, deadline: float) -> np.ndarray:
        """A message larger than the staging buffer: into a buffer of its own, straight from the socket."""
        out = np.empty(n, dtype=np.uint8)
        held = self._end - self._start - _LEN.size
        out[:held] = self._staging[self._start + _LEN.size:self._end]
        self._start = self._end = 0
        view = memoryview(out)
        while held < n:
            held += self._recv_some(view[held:], deadline)
        return out

    def _recv_some(self, view: memoryview, deadline: float) -> int:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            if not left <= self._rcvtimeo <= left * _TIMEOUT_SLACK:  # a syscall only when it is off
                self._rcvtimeo = left * (1 + _TIMEOUT_SLACK) / 2
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self._rcvtimeo))
            n = self.sock.recv_into(view)
        except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO ran out: EAGAIN on a blocking socket
            self.close()  # a message half read cannot be resumed: the pair is done, as a gloo timeout ends it
            raise RuntimeError("tcp pair: timed out waiting for the peer") from None
        except OSError as exc:
            self.close()
            raise RuntimeError(f"tcp pair receive failed: {exc}") from exc
        if n == 0:
            self.close()
            raise RuntimeError("tcp pair: the peer closed the connection")
        return n

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
