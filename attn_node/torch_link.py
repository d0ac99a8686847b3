"""The attention node's side of the torch transport (``--transport torch``): TorchLink.

A TorchLink has NodeLink's interface (``send() -> Future``, ``failure``, ``fail``,
``close``, ``info``), so RemoteExpertBackend's row grouping, replica split and
failover are the same for both transports: the backend takes a link factory.

Each TorchLink holds a gRPC NodeLink to the same expert node (for Info, and as
the fallback) and a :class:`TorchPair`: a world-size-2 process group with that
node (``moemesh/p2p.py``), set up through the node's ``TorchTransport.Session``
call in the background. Rows travel over gRPC until the group is up, and again
for good once it fails (a dead or silent peer, a timeout, a closed session):
messages the group had not answered are sent again over gRPC, and the backend
treats the node as lost only when gRPC fails too. A failed group is not rebuilt:
the next placement version builds new links, and with them new groups.

Threads per pair: one sends frames in order (and pings when idle so the expert
node's wait for the next frame stays bounded), one receives replies in the same
order. Every send and receive has a timeout; nothing waits on a peer forever.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future

import grpc
import torch

from moemesh import p2p
from moemesh.logs import get_logger
from moemesh.tls import TLSFiles
from moemesh.tls import channel as tls_channel
from moemesh.v1 import torch_transport_pb2, torch_transport_pb2_grpc

from .remote_backend import CHANNEL_OPTIONS, NodeLink

log = get_logger("moemesh.attn_node.torch")

_PING = object()
_STOP = object()


class PairFailure(Exception):
    def __init__(self, address: str, reason: str):
        super().__init__(f"torch transport to {address}: {reason}")
        self.address = address


class TorchPair:
    """One pair group with one expert node; connects in the background (``ready`` is set once up or failed)."""

    def __init__(self, address: str, channel: grpc.Channel, hidden_size: int, timeout_s: float,
                 connect_timeout_s: float, device: torch.device, ping_s: float, version: int):
        self.address, self.hidden_size, self.timeout_s = address, hidden_size, timeout_s
        self.device, self.backend, self.ping_s = device, p2p.backend_for(device), ping_s
        self.failure: str | None = None
        self.ready = threading.Event()
        self.messages = 0
        self._closed = False
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._inflight: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
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
            store = p2p.connect_store(first.store, timeout_s)
            hostname = p2p.local_host_toward(first.store.rpartition(":")[0])
            req_pg, rep_pg = p2p.new_pair_group(store, first.prefix, p2p.ATTN_RANK, first.backend or self.backend,
                                                timeout_s, hostname, self.device)
        except Exception as exc:
            self.fail(f"rendezvous at {first.store} failed: {exc}")
            return
        with self._lock:
            if self.failure is not None:  # closed or failed while we met
                return
            threading.Thread(target=self._send_loop, args=(req_pg,), name=f"torch-send-{self.address}",
                             daemon=True).start()
            threading.Thread(target=self._read_loop, args=(rep_pg,), name=f"torch-read-{self.address}",
                             daemon=True).start()
            threading.Thread(target=self._watch, name=f"torch-session-{self.address}", daemon=True).start()
        log.info("torch_pair_up", node=self.address, backend=first.backend, store=first.store)
        self.ready.set()

    def _watch(self) -> None:
        """The session call ends when the expert node ends the group (draining, a bad frame, its own failure)."""
        try:
            for _ in self._call:
                pass
            reason = "the expert node ended the session"
        except grpc.RpcError as exc:
            reason = f"session ended ({exc.code().name}: {exc.details()})"
        if not self._closed:
            self.fail(reason)

    # ---- data -------------------------------------------------------------
    def send(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, version: int) -> Future:
        fut: Future = Future()
        msg_id = next(self._ids)
        header, body = p2p.pack_request(msg_id, layer, x, idx, w, version, self.device)
        meta = (msg_id, x.shape[0], x.dtype, time.monotonic() + self.timeout_s)
        with self._lock:
            if self.failure is not None or self._closed:
                fut.set_exception(PairFailure(self.address, self.failure or "closed by the attention node"))
                return fut
            self._pending[msg_id] = fut
            self._outbox.put((header, body, meta))
        return fut

    def _send_loop(self, pg) -> None:
        dst, backend = p2p.EXPERT_RANK, self.backend
        try:
            while True:
                try:
                    item = self._outbox.get(timeout=self.ping_s)
                except queue.Empty:
                    item = _PING
                if self.failure is not None or item is _STOP:
                    return
                if item is _PING or item is None:  # None: closing, say bye after everything queued
                    kind = p2p.KIND_PING if item is _PING else p2p.KIND_BYE
                    p2p.wait(pg.send([p2p.control_header(kind, self.device)], dst, p2p.TAG_REQUEST), self.timeout_s,
                             backend, "sending a ping" if item is _PING else "saying bye")
                    if item is None:
                        self._inflight.put(None)
                        return
                    continue
                header, body, meta = item
                self._inflight.put(meta)  # the reader posts the reply's recv while we send
                works = [pg.send([header], dst, p2p.TAG_REQUEST), pg.send([body], dst, p2p.TAG_REQUEST)]
                for work in works:
                    p2p.wait(work, meta[3] - time.monotonic(), backend, "sending a dispatch frame")
        except p2p.P2PError as exc:
            self.fail(str(exc))

    def _read_loop(self, pg) -> None:
        src, backend = p2p.EXPERT_RANK, self.backend
        try:
            while (meta := self._inflight.get()) is not None:
                msg_id, rows, dtype, deadline = meta
                buf = torch.empty(p2p.reply_bytes(rows, self.hidden_size, dtype), dtype=torch.uint8, device=self.device)
                p2p.wait(pg.recv([buf], src, p2p.TAG_REPLY), deadline - time.monotonic(), backend,
                         "waiting for a reply")
                got, status, y = p2p.unpack_reply(buf, rows, self.hidden_size, dtype)
                if got != msg_id or status != 0:
                    raise p2p.P2PError(f"reply {got} (status {status}) where {msg_id} was due: frames out of step")
                with self._lock:
                    fut = self._pending.pop(msg_id, None)
                self.messages += 1
                if fut is not None:
                    fut.set_result(y)
        except p2p.P2PError as exc:
            self.fail(str(exc))

    # ---- ends -------------------------------------------------------------
    def fail(self, reason: str) -> None:
        """The group is done: unanswered messages fail with PairFailure (the link resends them over gRPC)."""
        with self._lock:
            first = self.failure is None
            if first:
                self.failure = reason
            pending, self._pending = self._pending, {}
        self._outbox.put(_STOP)
        self._inflight.put(None)
        self.ready.set()
        if first and not self._closed:
            log.warning("torch_pair_failed", node=self.address, reason=reason,
                        fallback="gRPC until the next placement version")
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(PairFailure(self.address, reason))
        # Our threads drop the group when they return (each wait is bounded), which closes its sockets;
        # destroying it under a blocked wait is not safe.
        self._call.cancel()

    def close(self) -> None:
        with self._lock:
            self._closed = True  # sends from now on fail (the link sends them over gRPC, closed too)
        if self.up:
            self._outbox.put(None)  # bye after what is queued; the reader then finishes its replies
            timer = threading.Timer(self.timeout_s, self.fail, args=("closed by the attention node",))
            timer.daemon = True
            timer.start()  # a backstop: a group that cannot say bye is failed (its waits are bounded anyway)
        else:
            self.fail("closed by the attention node")


class TorchLink:
    """NodeLink's interface; payloads over a pair group when it is up, over the gRPC NodeLink otherwise."""

    def __init__(self, address: str, connect_timeout_s: float = 10.0, tls: TLSFiles | None = None, *,
                 hidden_size: int, timeout_s: float = 30.0, device: torch.device | str = "cpu",
                 ping_s: float = 5.0, version: int = 0):
        self.address = address
        self.grpc = NodeLink(address, connect_timeout_s, tls)
        self.fallback_messages = 0
        try:
            self._channel = tls_channel(address, tls, CHANNEL_OPTIONS)
            self.pair = TorchPair(address, self._channel, hidden_size, timeout_s, connect_timeout_s,
                                  torch.device(device), ping_s, version)
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

    def send(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, version: int) -> Future:
        if not self.pair.up:
            self.fallback_messages += self.pair.failure is not None
            return self.grpc.send(layer, x, idx, w, version)
        outer: Future = Future()

        def done(inner: Future) -> None:
            if inner.exception() is None:
                outer.set_result(inner.result())
                return
            self.fallback_messages += 1  # the group broke with this message in flight: resend it over gRPC
            self.grpc.send(layer, x, idx, w, version).add_done_callback(lambda again: _copy(again, outer))

        self.pair.send(layer, x, idx, w, version).add_done_callback(done)
        return outer

    def fail(self, reason: str) -> None:
        self.pair.fail(reason)
        self.grpc.fail(reason)

    def close(self) -> None:
        self.pair.close()
        self.grpc.close()
        timer = threading.Timer(self.pair.timeout_s + 1.0, self._channel.close)  # after the pair's bye
        timer.daemon = True
        timer.start()


def _copy(src: Future, dst: Future) -> None:
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
    """RemoteExpertBackend's ``link_factory`` for ``--transport``: None (plain NodeLinks) for grpc."""
    if transport == "grpc":
        return None
    if transport != "torch":
        raise ValueError(f"--transport {transport!r}: grpc or torch")
    return torch_links(hidden_size, timeout_s, device, version=version)
