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

The C frame loop (p2p_native.c, when it builds: :mod:`moemesh.wire.p2p_native`) does the same per message:
the same wire, the same staging buffer and timeout policy, errors with the same messages; a pair uses one or
the other for its life (``native``). :meth:`SocketPair.send_request` and :meth:`SocketPair.send_reply` are its
two sends (p2p.py's frames, built in C straight from the tensors' memory); :meth:`SocketPair.recv_frame`
is ``recv_message`` with the message's address, for the checks the expert node runs in C. A C receive
spins up to ``MOEMESH_P2P_SPIN_US`` (default ``p2p_native.SPIN_US``) before it blocks, backing off while spins do
not pay (p2p_native.c ``spin_recv`` says why and how); the Python path blocks at once.

Rendezvous: p2p_groups.py. Tags are not sent: requests flow only to the node and replies only back, in order.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

import numpy as np
import torch

from moemesh.wire import p2p_native
from moemesh.wire.p2p_socket_ends import RECV, SEND, StreamEnds
from moemesh.wire.p2p_socket_work import SENT, SocketWork
from moemesh.wire.p2p_native import (BLOCK_LIMIT_DEADLINE, BLOCK_RECV_FIXED, BLOCK_REPLY, BLOCK_REPLY_COUNT, BLOCK_SEND,
                                     BLOCK_SEND_FIXED, BLOCK_SERVE_AT, BLOCK_SERVE_TABLES, BLOCK_TAKE, BLOCK_TAKE_FIXED)

_LEN = struct.Struct("<q")  # little-endian int64, as the frames
_PREFIX = struct.Struct("<5q")  # a reply's prefix (p2p.REPLY_PREFIX bytes)
_IDS = (torch.int64, torch.int32)  # what the C send narrows to int32 itself
STAGING_BYTES = 1 << 20  # the receive buffer: a decode step's message (and the next ones) lands here whole
_EBADF = -errno.EBADF  # a C call's answer on a closed descriptor
_TIMEOUT_SLACK = 1.1  # the kernel's receive timeout is reset only when it is off by more than this factor


def _timeval(seconds: float) -> bytes:
    seconds = max(seconds, 0.001)
    return struct.pack("@ll", int(seconds), int((seconds % 1.0) * 1e6))


class SocketPair(StreamEnds):
    """One connected stream of a pair; ``send``/``recv`` as a world-size-2 process group's (tags ignored).

    Sends and receives run on different threads (the attention node's engine sends, a waiter receives), so each
    direction has its own socket object over the one connection (``dup``); both are blocking (the same file
    flags), bounded by the kernel's per-direction timeouts. One thread receives at a time (the callers' order)."""

    def __init__(self, sock: socket.socket, send_timeout_s: float = 30.0, staging_bytes: int = STAGING_BYTES,
                 spin_us: float | None = None):
        """Owns ``sock`` from here: closed when the pair cannot be made (a bad ``MOEMESH_P2P_SPIN_US`` included)."""
        try:
            self._setup(sock, send_timeout_s, staging_bytes, spin_us)
        except BaseException:
            self._closed = True  # nothing for __del__ to do: both sockets are closed here
            sock.close()
            out = self.__dict__.get("_out")
            if out is not None:
                out.close()
            raise

    def _setup(self, sock: socket.socket, send_timeout_s: float, staging_bytes: int, spin_us: float | None) -> None:
        self._init_ends()
        native = p2p_native.load()  # the C frame loop, or None: this pair's Python path
        spin = p2p_native.spin_ns(spin_us) if native is not None else 0  # a bad setting raises before anything
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send_timeout_s))
        self.sock = sock  # receives
        self._out = sock.dup()  # sends
        self._rcvtimeo = -1.0  # what SO_RCVTIMEO is set to (none yet)
        self._staging = np.empty(staging_bytes, dtype=np.uint8)
        self._view = memoryview(self._staging)
        self._start = self._end = 0  # the received bytes not handed out yet: _staging[_start:_end]
        self.native = native
        if native is not None:
            self._setup_native(spin)

    def _setup_native(self, spin: int) -> None:
        """Buffers the C calls read and write, allocated once, and their addresses (numpy's ``ctypes.data``
        costs microseconds per call)."""
        self._rfd, self._wfd = self.sock.fileno(), self._out.fileno()  # -1 once closed: a call then fails cleanly
        self._pos = np.zeros(2, dtype=np.int64)  # the staging buffer's [start, end), as _start/_end are in Python
        self._timeo = np.full(1, -1.0)  # what SO_RCVTIMEO is set to
        self._len = np.zeros(1, dtype=np.int64)  # a message's length, from the C side
        self._head = np.zeros(8, dtype=np.int64)  # a request header / a reply prefix, written in place (sends)
        self._got = np.zeros(2, dtype=np.int64)  # a checked receive's message offset and length (receives)
        self._scratch = np.empty(4096, dtype=np.uint8)  # a request's lengths, header, ids and weights (grown)
        # p2p_native.c spin_t (SPIN_FIELDS)
        self._spin = np.array([spin, 0, 1, 0, 0, 0, p2p_native.PREEMPT_NS], dtype=np.int64)
        self._addr = {name: getattr(self, name).ctypes.data for name in ("_staging", "_pos", "_timeo", "_len", "_head",
                                                                     "_got", "_spin")}
        # The C calls' argument blocks (p2p_native.c's recv_args/serve_args, send_args, reply_args): one pointer
        # per call; the fields that do not change are written here, the rest per message.
        self._recv_args = np.zeros(16, dtype=np.int64)  # receives (one thread at a time)
        self._send_args = np.zeros(16, dtype=np.int64)  # requests
        self._reply_args = np.zeros(12, dtype=np.int64)  # replies
        self._take_args = np.zeros(4, dtype=np.int64)  # replies taken (p2p_native.c take_args: recv_args *, ...)
        self._prefix = np.zeros(5, dtype=np.int64)  # a taken reply's prefix
        self._args_addr = tuple(a.ctypes.data for a in (self._recv_args, self._send_args, self._reply_args,
                                                        self._take_args))
        BLOCK_TAKE_FIXED.pack_into(self._take_args, 0, self._args_addr[0], self._prefix.ctypes.data)
        BLOCK_RECV_FIXED.pack_into(self._recv_args, 16, self._rfd, self._addr["_staging"], self._staging.nbytes,
                              self._addr["_pos"], self._addr["_timeo"], _TIMEOUT_SLACK, self._addr["_len"],
                              self._addr["_spin"])
        self._set_send_fd(self._wfd)
        self._checks = self._checks_args = None  # the FrameChecks (and its tables) the receive block holds

    def _set_send_fd(self, fd: int) -> None:
        BLOCK_SEND_FIXED.pack_into(self._send_args, 0, fd, self._scratch.ctypes.data)
        _LEN.pack_into(self._reply_args, 0, fd)

    # ---- sends ------------------------------------------------------------
    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> SocketWork:
        (t,) = tensors
        self.send_parts([t.numpy()])  # the tensor's own bytes (contiguous uint8 frames)
        return SENT

    def send_parts(self, parts: list) -> None:
        """One message of ``parts`` (contiguous buffers: bytes, numpy arrays) in one ``sendmsg``, nothing copied.

        RuntimeError (the pair closed) when it cannot be sent whole."""
        views = [memoryview(p).cast("B") for p in parts]
        total = sum(v.nbytes for v in views)
        views.insert(0, memoryview(_LEN.pack(total)))
        try:
            self._held(SEND, None, self._send_views, views, total + _LEN.size)
        except OSError as exc:  # a timeout (the peer's window stayed full) included
            self.close()
            raise RuntimeError(f"tcp pair send failed: {exc}") from exc

    def _send_views(self, views: list[memoryview], total: int) -> None:
        sent = self._out.sendmsg(views)
        if sent < total:  # a full socket buffer (large bodies): the rest in order
            for v in views:
                if sent >= v.nbytes:
                    sent -= v.nbytes
                    continue
                self._out.sendall(v[sent:])
                sent = 0

    def send_request(self, head: tuple, ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> None:
        """A dispatch request (p2p.py's frames: ``head`` is the header's 8 ints, kind first) from contiguous host
        tensors: ids int64 or int32 [rows, k] (sent as int32), weights float32 [rows, k], x the rows. Native: one
        gathering send built in C; else the Python path's parts (p2p.request_parts)."""
        if self.native is None:
            from moemesh.wire.p2p import request_parts_from  # p2p imports this module

            for parts in request_parts_from(head, ids, weights, x):
                self.send_parts(parts)
            return
        if ids.dtype not in _IDS or not ids.is_contiguous():
            ids = ids.to(torch.int64).contiguous()
        if weights.dtype != torch.float32 or not weights.is_contiguous():
            weights = weights.detach().float().contiguous()
        if self._scratch.nbytes < 80 + head[3] * head[4] * 8:
            self._scratch = np.empty(80 + head[3] * head[4] * 8, dtype=np.uint8)
            self._set_send_fd(self._wfd)
        BLOCK_SEND.pack_into(self._send_args, 16, ids.data_ptr(), ids.element_size(), weights.data_ptr(), x.data_ptr(),
                        x.numel() * x.element_size(), *head)
        rc = self._held(SEND, _EBADF, self.native.mm_send, self._args_addr[1])
        if rc < 0:
            self._native_failed(rc, "send")

    def send_reply(self, prefix: tuple, y: torch.Tensor, count: tuple = (0, 0, 0, 0)) -> None:
        """A reply: ``prefix`` (msg_id, status, receive_ns, compute_ns, send_ns) and a contiguous host tensor's
        bytes (p2p.reply_parts' bytes). Native: ``count`` (ids address, n, counts address, n_experts: the request's
        checked int32 ids and an int64 [n_experts] table, or zeros) has the routed ids added to the table once the
        reply is sent, in the same C call; the Python path ignores it (its caller counts)."""
        if self.native is None:
            from moemesh.wire.p2p import reply_parts

            self.send_parts(reply_parts(prefix[0], y, *prefix[1:]))
            return
        if y.device.type != "cpu" or not y.is_contiguous():  # C reads numel * itemsize bytes at data_ptr
            raise ValueError(f"send_reply: y must be a contiguous host tensor, got one on {y.device} "
                             f"(contiguous={y.is_contiguous()})")
        BLOCK_REPLY.pack_into(self._reply_args, 8, y.data_ptr(), y.numel() * y.element_size(), *prefix)
        BLOCK_REPLY_COUNT.pack_into(self._reply_args, 64, *count)
        rc = self._held(SEND, _EBADF, self.native.mm_reply, self._args_addr[2])
        if rc < 0:
            self._native_failed(rc, "send")

    def _native_failed(self, rc: int, what: str) -> None:
        """A C call's negative code as the Python path's error: the pair is closed first, as there."""
        self.close()
        if rc == p2p_native.ERR_TIMEOUT:
            raise RuntimeError("tcp pair: timed out waiting for the peer" if what == "receive"
                               else f"tcp pair {what} failed: timed out")
        if rc == p2p_native.ERR_CLOSED:
            raise RuntimeError("tcp pair: the peer closed the connection")
        raise RuntimeError(f"tcp pair {what} failed: {os.strerror(-rc) if -rc < 4096 else rc}")

    def spin_stats(self) -> dict[str, int]:
        """The C receive's spin (SPIN_FIELDS: its limit, its backoff, how its spins went); {} on the Python path,
        whose receives block at once."""
        return {} if self.native is None else dict(zip(p2p_native.SPIN_FIELDS, self._spin.tolist()))

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

    def recv_frame(self, timeout_s: float | None, limit: int) -> tuple[np.ndarray, int]:
        """:meth:`recv_message` and the message's address (for C checks of its bytes; numpy's is slow)."""
        if self.native is None:
            msg = self.recv_message(timeout_s, limit)
            return msg, msg.ctypes.data
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else 3600.0)
        BLOCK_LIMIT_DEADLINE.pack_into(self._recv_args, 0, limit, deadline)
        off = self._held(RECV, _EBADF, self.native.mm_recv, self._args_addr[0])
        if off >= 0:
            return self._staging[off:off + int(self._len[0])], self._addr["_staging"] + off
        msg = self._native_rare(off, limit, deadline)
        return msg, msg.ctypes.data

    def recv_reply(self, timeout_s: float, reply_size: int, out: torch.Tensor) -> tuple[int, ...] | int:
        """Native only: the reply due (``reply_size`` bytes), taken in one C call (p2p_native.c mm_take), its rows
        copied into ``out`` (contiguous, host, ``reply_size - p2p.REPLY_PREFIX`` bytes); its prefix (msg_id, status,
        receive_ns, compute_ns, send_ns) for the caller to check, or a shorter message's length (an int: the
        frames are out of step). Errors as :meth:`recv_message`'s; ValueError (nothing read) for an ``out`` of
        another size, or not a contiguous host tensor."""
        if out.device.type != "cpu" or not out.is_contiguous():  # C writes numel * itemsize bytes at data_ptr
            raise ValueError(f"recv_reply: out must be a contiguous host tensor, got one on {out.device} "
                             f"(contiguous={out.is_contiguous()})")
        deadline = time.monotonic() + timeout_s
        BLOCK_LIMIT_DEADLINE.pack_into(self._recv_args, 0, reply_size, deadline)
        BLOCK_TAKE.pack_into(self._take_args, 16, out.data_ptr(), out.numel() * out.element_size())
        rc = self._held(RECV, _EBADF, self.native.mm_take, self._args_addr[3])
        if rc == 0:
            return tuple(self._prefix.tolist())
        if rc == p2p_native.ERR_OTHER:
            return int(self._len[0])
        if rc == p2p_native.ERR_ARGS:  # the caller's mistake, found before a byte was read: the stream is intact
            raise ValueError(f"recv_reply: out holds {out.numel() * out.element_size()} bytes; a reply of {reply_size} "
                             f"bytes carries {reply_size - _PREFIX.size} bytes of rows after its prefix")
        if rc == p2p_native.ERR_LARGE:  # a reply larger than the staging buffer (a large prefill step)
            msg = self._native_rare(rc, reply_size, deadline)
            if msg.nbytes != reply_size:
                return msg.nbytes
            out.view(-1).view(torch.uint8).numpy()[:] = msg[_PREFIX.size:]
            return _PREFIX.unpack_from(msg)
        self._native_rare(rc, reply_size, deadline)  # raises
        raise AssertionError("unreachable")  # pragma: no cover

    def recv_checked(self, timeout_s: float, limit: int, checks) -> tuple[np.ndarray, int, int]:
        """Native only: the next message, received and, when it is an inline dispatch frame, checked in the same
        C call against ``checks`` (the expert node's tables: ``checks.args``, see p2p_native.c mm_serve).
        (message, its address, routed count) where the count is -1 for a message the caller must handle itself
        (a control frame, a two-message request, or one that failed a check: the Python checks name what)."""
        deadline = time.monotonic() + timeout_s
        if checks is not self._checks or checks.args is not self._checks_args:  # new tables (a reload): once
            BLOCK_SERVE_TABLES.pack_into(self._recv_args, BLOCK_SERVE_AT, self._addr["_got"], *checks.args)
            self._checks, self._checks_args = checks, checks.args
        BLOCK_LIMIT_DEADLINE.pack_into(self._recv_args, 0, limit, deadline)
        rc = self._held(RECV, _EBADF, self.native.mm_serve, self._args_addr[0])
        if rc >= 0 or rc == p2p_native.ERR_OTHER:
            off, n = self._got.tolist()
            return self._staging[off:off + n], self._addr["_staging"] + off, max(rc, -1)
        if rc == p2p_native.ERR_LARGE or rc == p2p_native.ERR_TOO_LONG:
            self._len[0] = self._got[1]
        msg = self._native_rare(rc, limit, deadline)
        return msg, msg.ctypes.data, -1

    def _native_rare(self, rc: int, limit: int, deadline: float) -> np.ndarray:
        """A C receive that did not hand out a staged message: one larger than the staging buffer, or an error."""
        n = int(self._len[0])
        if rc == p2p_native.ERR_LARGE:
            out = np.empty(n, dtype=np.uint8)
            rc = self._held(RECV, _EBADF, self.native.mm_recv_large, self._rfd, self._addr["_staging"],
                            self._addr["_pos"], out.ctypes.data, n, deadline, self._addr["_timeo"], _TIMEOUT_SLACK)
            if rc == 0:
                return out
        if rc == p2p_native.ERR_TOO_LONG:
            self.close()  # the stream is out of step: nothing after this can be trusted
            raise RuntimeError(f"tcp pair: a message of {n} bytes for a buffer of {limit}")
        self._native_failed(rc, "receive")

    def recv_message(self, timeout_s: float | None, limit: int) -> np.ndarray:
        """The next message (at most ``limit`` bytes) as a uint8 view, valid until the next receive of this pair.

        RuntimeError (the pair closed) on a timeout, a closed stream or a message over ``limit``."""
        if self.native is not None:
            return self.recv_frame(timeout_s, limit)[0]
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
            n = self._held(RECV, None, self._recv_into, view, left)
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

    def _recv_into(self, view: memoryview, left: float) -> int:
        if not left <= self._rcvtimeo <= left * _TIMEOUT_SLACK:  # a syscall only when it is off
            self._rcvtimeo = left * (1 + _TIMEOUT_SLACK) / 2
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self._rcvtimeo))
        return self.sock.recv_into(view)

    def _mark_closed(self) -> None:
        self._rfd = self._wfd = -1  # a C call after this fails (EBADF) rather than use a reused descriptor
        if self.native is not None:
            _LEN.pack_into(self._recv_args, 16, -1)
            self._set_send_fd(-1)
