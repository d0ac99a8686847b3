"""The attention node's side of the torch transport (``--transport torch``): TorchLink.

A TorchLink has NodeLink's interface (``send() -> Future``, ``failure``, ``fail``,
``close``, ``info``), so RemoteExpertBackend's row grouping, replica split and
failover are the same for both transports: the backend takes a link factory.

Each TorchLink holds a gRPC NodeLink to the same expert node (for Info, and as
the fallback) and a :class:`TorchPair`: a world-size-2 process group with that
node (``moemesh/wire/p2p.py``), set up through the node's ``TorchTransport.Session``
call in the background. Rows travel over gRPC until the group is up, and again
for good once it fails (a dead or silent peer, a timeout, a closed session):
messages the group had not answered are sent again over gRPC, and the backend
treats the node as lost only when gRPC fails too. A failed group is not rebuilt:
the next placement version builds new links, and with them new groups.

Threads per pair: one sends frames in order (and pings when idle so the expert
node's wait for the next frame stays bounded), one receives replies in the same
order (gloo, NCCL: torch_group_path.py); over the ``tcp`` stream, the thread that waits for a reply reads it
(direct_replies.py). Every send and receive has a timeout; nothing waits on a peer forever.
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import grpc
import torch

from moemesh.wire import p2p, p2p_groups
from moemesh.logs import get_logger
from moemesh.wire.tls import TLSFiles
from moemesh.wire.tls import channel as tls_channel
from moemesh.v1 import torch_transport_pb2, torch_transport_pb2_grpc

from .direct_replies import DirectReplies, ReplyFuture, ReplyRows
from .torch_group_path import GroupPath
from .hop_stats import HopRecorder
from .remote_backend import CHANNEL_OPTIONS, NodeLink, rows_with_work

log = get_logger("moemesh.attn_node.torch")


class PairFailure(Exception):
    def __init__(self, address: str, reason: str):
        super().__init__(f"torch transport to {address}: {reason}")
        self.address = address


class TorchPair(GroupPath):
    """One pair group with one expert node; connects in the background (``ready`` is set once up or failed)."""

    def __init__(self, address: str, channel: grpc.Channel, hidden_size: int, timeout_s: float,
                 connect_timeout_s: float, device: torch.device, ping_s: float, version: int,
                 on_lost: Callable[[Future, tuple], None] | None = None):
        self.address, self.hidden_size, self.timeout_s = address, hidden_size, timeout_s
        self.on_lost = on_lost  # gets (future, send args) of each message the group did not answer
        self.device, self.backend, self.ping_s = device, p2p.backend_for(device), ping_s
        self.failure: str | None = None
        self.ready = threading.Event()
        self.messages = 0
        self.inline_bytes = 0
        self.hops = HopRecorder(address)
        self._pg = None  # the request group while the pair is up; the reader thread holds the reply group
        self._reader: threading.Thread | None = None  # owns the groups: they go when it returns
        self._direct: DirectReplies | None = None  # tcp: replies read by their waiters, no reader thread
        self._rows = ReplyRows(hidden_size)  # tcp: where the replies' rows land
        self._stream = None  # tcp: the pair's one stream (closed by fail)
        self._closed = False
        self._last_send = time.monotonic()
        self._inflight: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[int, tuple[Future, tuple]] = {}  # gloo, NCCL: unanswered (tcp: DirectReplies' futures)
        self._lock = threading.Lock()  # posting order is frame order
        self._ids = itertools.count()
        self._call = torch_transport_pb2_grpc.TorchTransportStub(channel).Session(torch_transport_pb2.SessionRequest(
            backend=self.backend, hidden_size=hidden_size, timeout_s=timeout_s, ping_interval_s=ping_s,
            placement_version=version))
        threading.Thread(target=self._connect, args=(connect_timeout_s,), name=f"torch-connect-{address}",
                         daemon=True).start()

    @property
    def up(self) -> bool:
        return self.ready.is_set() and self.failure is None

    # ---- set-up -----------------------------------------------------------
    def _connect(self, timeout_s: float) -> None:
        timer = threading.Timer(timeout_s, self._call.cancel)  # a silent node cannot hold the first event
        timer.start()
        try:
            first = next(self._call)
        except grpc.RpcError as exc:
            self.fail(f"no session ({exc.code().name}: {exc.details()})")
            return
        except StopIteration:
            self.fail("the session ended before it began")
            return
        finally:
            timer.cancel()
        try:
            store = p2p_groups.connect_store(first.store, timeout_s)
            hostname = p2p_groups.local_host_toward(first.store.rpartition(":")[0])
            req_pg, rep_pg = p2p_groups.new_pair_group(store, first.prefix, p2p.ATTN_RANK, first.backend or self.backend,
                                                timeout_s, hostname, self.device)
        except Exception as exc:
            self.fail(f"rendezvous at {first.store} failed: {exc}")
            return
        with self._lock:
            if self.failure is not None:  # closed or failed while we met
                return
            self._pg, self.inline_bytes = req_pg, first.inline_bytes
            self._last_send = time.monotonic()
            if (first.backend or self.backend) == "tcp":
                self._stream = rep_pg
                # partial: no lambda frame per reply
                self._direct = DirectReplies(functools.partial(self._take_stream_reply, rep_pg), self.fail)
            else:
                self._reader = threading.Thread(target=self._read_loop, args=(req_pg, rep_pg),
                                                name=f"torch-read-{self.address}", daemon=True)
                self._reader.start()
            threading.Thread(target=self._keep, name=f"torch-keep-{self.address}", daemon=True).start()
        log.info("torch_pair_up", node=self.address, backend=first.backend, store=first.store)
        self.ready.set()

    # ---- data -------------------------------------------------------------
    def send(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, version: int,
             trim: bool = False) -> Future:
        """Post the request's sends now (in call order); the reader thread waits for them and for the reply.

        ``trim`` as NodeLink's, with host frames only (tcp, gloo)."""
        direct = self._direct
        if direct is not None:
            return self._send_stream(direct, layer, x, idx, w, version, trim)
        return self._send_group(layer, x, idx, w, version, trim)

    def _send_stream(self, direct: DirectReplies, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                     version: int, trim: bool) -> Future:
        """:meth:`send` on the tcp stream: the request written at once (one gathering send, built from the
        tensors' own memory), its reply read later by whoever waits for it (DirectReplies). The future is the
        message's entry: what its reader needs rides on it."""
        sent_at = time.monotonic()  # the hop is timed from here: packing is part of it
        args = (layer, x, idx, w, version, trim)
        if trim:  # trailing rows without work (the backend puts them last) need not cross
            n = self._rows_with_work(idx)
            if n == 0:
                fut = ReplyFuture(direct)
                fut.set_result(torch.zeros((0, x.shape[1]), dtype=x.dtype, device=x.device))
                return fut
            if n < x.shape[0]:
                x, idx, w = x[:n], idx[:n], w[:n]
        if not x.is_contiguous():
            x = x.contiguous()
        rows, hidden = x.shape
        k, itemsize = idx.shape[1], x.element_size()
        msg_id = next(self._ids)
        reply_size = p2p.REPLY_PREFIX + rows * self.hidden_size * itemsize
        body = rows * k * 8 + rows * hidden * itemsize
        head = (p2p.KIND_INLINE if body <= self.inline_bytes else p2p.KIND_DISPATCH, msg_id, layer, rows, k, version,
                p2p.dtype_code(x.dtype), hidden)  # p2p.request_head's, inline: this runs once per message
        fut = ReplyFuture(direct, msg_id, rows, x.dtype, sent_at + self.timeout_s, sent_at, reply_size, args)
        direct.before_send(p2p.HEADER_BYTES + body, reply_size)
        with self._lock:
            stream = self._stream
            if self.failure is not None or self._closed or stream is None:
                self._lost(fut, args, self.failure or "closed by the attention node")
                return fut
            try:
                stream.send_request(head, idx, w, x)
            except RuntimeError as exc:
                error = str(exc)
            else:  # sent already (a tcp send returns once written): only the reply is due
                direct.add(fut)
                self._last_send = sent_at
                return fut
        self.fail(f"sending a dispatch frame: {error}")
        self._lost(fut, args, self.failure)
        return fut

    def _rows_with_work(self, idx: torch.Tensor) -> int:
        """How many leading rows have work (remote_backend.rows_with_work), in C when the stream has it."""
        native = getattr(self._stream, "native", None)
        if native is not None and idx.dtype in (torch.int64, torch.int32) and idx.is_contiguous():
            return native.mm_rows_with_work(idx.data_ptr(), idx.element_size(), idx.shape[0], idx.shape[1])
        return rows_with_work(idx.numpy())

    def _lost(self, fut: Future, args: tuple, reason: str) -> None:
        if self.on_lost is not None:
            self.on_lost(fut, args)
        elif not fut.done():
            fut.set_exception(PairFailure(self.address, reason))

    def _take_stream_reply(self, stream, fut: ReplyFuture) -> torch.Tensor:
        """The tcp stream's :meth:`_take_reply` of the first message due (DirectReplies): one read (the reply
        usually comes whole with its length), the rows copied once out of the stream's buffer into the tensor
        returned (which resolves ``fut``)."""
        msg_id, rows, dtype, reply_size = fut.msg_id, fut.rows, fut.dtype, fut.reply_size
        try:
            if stream.native is not None:  # received, checked for length and copied into the rows in one C call
                rows_out = self._rows.take(rows, dtype)
                prefix = stream.recv_reply(fut.deadline - time.monotonic(), reply_size, rows_out)
            else:
                msg = stream.recv_message(fut.deadline - time.monotonic(), reply_size)
                prefix = msg.nbytes if msg.nbytes != reply_size else p2p.reply_prefix(msg)
                rows_out = None
        except RuntimeError as exc:
            raise p2p.P2PError(f"waiting for a reply: {exc}") from exc
        if prefix.__class__ is int:
            raise p2p.P2PError(f"reply of {prefix} bytes where {reply_size} were due: frames out of step")
        reply_id, status, receive_ns, compute_ns, send_ns = prefix
        if reply_id != msg_id or status != 0:
            raise p2p.P2PError(f"reply {reply_id} (status {status}) where {msg_id} was due: frames out of step")
        self.messages += 1
        self.hops.record(time.monotonic() - fut.sent_at, receive_ns, compute_ns, send_ns)
        return rows_out if rows_out is not None else p2p.host_reply_rows(msg, rows, self.hidden_size, dtype)

    def _keep(self) -> None:
        """Ping when idle, so the expert node's bounded wait for the next frame does not end a quiet group."""
        while self.failure is None and not self._closed:
            time.sleep(self.ping_s / 4)
            if time.monotonic() - self._last_send >= self.ping_s:
                self._control(p2p.KIND_PING)

    def _control(self, kind: int) -> bool:
        frame = p2p.control_frame(kind, self.device)
        with self._lock:
            if self.failure is not None or self._pg is None:
                return False
            try:
                work = self._pg.send([frame], p2p.EXPERT_RANK, p2p.TAG_REQUEST)
            except RuntimeError as exc:
                error = str(exc)
            else:
                if self._direct is None:  # gloo: the reader waits for the send; a tcp send is done already
                    self._inflight.put((None, 0, None, time.monotonic() + self.timeout_s, [work], [frame], 0.0))
                self._last_send = time.monotonic()
                return True
        self.fail(f"sending a control frame: {error}")
        return False

    # ---- ends -------------------------------------------------------------
    def fail(self, reason: str) -> None:
        """The group is done: unanswered messages go to ``on_lost`` (the link resends them over gRPC)."""
        with self._lock:
            first = self.failure is None
            if first:
                self.failure = reason
            pending, self._pending = self._pending, {}
            self._pg = None  # the reader thread drops the groups when it returns (its waits are bounded)
            stream, self._stream = self._stream, None
        lost = []
        if self._direct is not None:
            self._direct.failed = True
            lost = self._direct.drain()  # the futures due: a reader mid-read resolves none of them now
        if stream is not None:
            stream.close()  # a waiter reading it gets an error at once, and no frame goes out after this
        self._inflight.put(None)
        self.ready.set()
        if first and not self._closed:
            log.warning("torch_pair_failed", node=self.address, reason=reason,
                        fallback="gRPC until the next placement version")
        for fut, args in pending.values():
            self._lost(fut, args, reason)
        for fut in lost:
            self._lost(fut, fut.args, reason)
        self._call.cancel()

    def close(self) -> None:
        """Say bye after the frames already posted; the reader finishes their replies, then the group goes."""
        frame = p2p.control_frame(p2p.KIND_BYE, self.device)
        with self._lock:
            if self._closed:
                return
            self._closed = True  # no sends, no pings from now on
            pg, self._pg = (self._pg if self.failure is None else None), None
            if pg is not None:
                try:
                    work = pg.send([frame], p2p.EXPERT_RANK, p2p.TAG_REQUEST)
                    if self._direct is None:
                        self._inflight.put((None, 0, None, time.monotonic() + self.timeout_s, [work], [frame], 0.0))
                except RuntimeError:
                    pg = None
        if pg is not None and self._direct is not None:
            self._direct.read_until(None, time.monotonic() + self.timeout_s)  # the replies due, then the stream goes
        self._inflight.put(None)
        if pg is None:
            self.fail("closed by the attention node")
        # Wait (bounded: every wait of the reader is) until the groups are gone, so that a process exiting
        # right after close() never tears torch.distributed down under a thread still using it.
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(self.timeout_s + 1.0)
        self.fail("closed by the attention node")  # ends the session call; anything unanswered goes to on_lost
        self.hops.flush()


class TorchLink:
    """NodeLink's interface; payloads over a pair group when it is up, over the gRPC NodeLink otherwise."""

    def __init__(self, address: str, connect_timeout_s: float = 10.0, tls: TLSFiles | None = None, *,
                 hidden_size: int, timeout_s: float = 30.0, device: torch.device | str = "cpu",
                 ping_s: float = 5.0, version: int = 0):
        self.address = address
        self.grpc = NodeLink(address, connect_timeout_s, tls, device=device)
        self.fallback_messages = 0
        try:
            self._channel = tls_channel(address, tls, CHANNEL_OPTIONS)
            self.pair = TorchPair(address, self._channel, hidden_size, timeout_s, connect_timeout_s,
                                  torch.device(device), ping_s, version, on_lost=self._resend)
        except BaseException:
            self.grpc.close()
            raise

    @property
    def failure(self) -> str | None:
        """The node is lost only when gRPC is: a failed group alone just moves its rows to gRPC."""
        return self.grpc.failure

    @property
    def transport(self) -> str:
        return "torch" if self.pair.up else "grpc"

    def info(self, timeout_s: float = 10.0):
        return self.grpc.info(timeout_s)

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until the group is up (True) or has failed (False); for benches and tests."""
        self.pair.ready.wait(timeout_s)
        return self.pair.up

    def send(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, version: int,
             trim: bool = False) -> Future:
        if not self.pair.up:
            self.fallback_messages += self.pair.failure is not None
            return self.grpc.send(layer, x, idx, w, version, trim)
        return self.pair.send(layer, x, idx, w, version, trim)

    def _resend(self, fut: Future, args: tuple) -> None:
        """A message the group did not answer goes over gRPC; its future is resolved by that answer."""
        self.fallback_messages += 1
        self.grpc.send(*args).add_done_callback(lambda again: _copy(again, fut))

    def fail(self, reason: str) -> None:
        self.pair.fail(reason)
        self.grpc.fail(reason)

    def close(self) -> None:
        self.pair.close()  # returns once the group is gone (bounded)
        self.grpc.close()
        self._channel.close()


def _copy(src: Future, dst: Future) -> None:
    if dst.done():
        return
    if src.exception() is not None:
        dst.set_exception(src.exception())
    else:
        dst.set_result(src.result())


def torch_links(hidden_size: int, timeout_s: float = 30.0, device: torch.device | str = "cpu", ping_s: float = 5.0,
                version: int = 0):
    """A link factory for RemoteExpertBackend: ``factory(address, connect_timeout_s, tls) -> TorchLink``."""

    def factory(address: str, connect_timeout_s: float = 10.0, tls: TLSFiles | None = None) -> TorchLink:
        return TorchLink(address, connect_timeout_s, tls, hidden_size=hidden_size, timeout_s=timeout_s,
                         device=device, ping_s=ping_s, version=version)

    return factory


def links_for(transport: str, hidden_size: int, timeout_s: float = 30.0, version: int = 0,
              device: torch.device | str = "cpu"):
    """RemoteExpertBackend's ``link_factory`` for ``--transport``; ``device`` is the model's (the backend's too)."""
    if transport == "grpc":
        return lambda address, connect_timeout_s=10.0, tls=None: NodeLink(address, connect_timeout_s, tls,
                                                                          device=device)
    if transport != "torch":
        raise ValueError(f"--transport {transport!r}: grpc or torch")
    return torch_links(hidden_size, timeout_s, device, version=version)
