"""The expert node's side of the torch transport (``--transport torch``): TorchTransport sessions.

An attention node calls ``Session``; this node answers with its TCPStore address
and a fresh key prefix, joins the pair group as rank 1 and serves dispatch frames
(``moemesh/wire/p2p.py``) on one thread per session: receive a header and its body,
validate them as the gRPC path does, run the shard, send the partial rows back.
The call stays open while the group lives. Either end closing it ends the group:
a cancelled call lets the thread stop after its current frame; a group that fails
(a dead or silent peer, a bad frame) ends the call with a status saying why. A
session never blocks forever: the idle wait for the next header is bounded by a
few of the peer's ping intervals, every other wait by the peer's timeout.

ExpertDispatch keeps serving beside this service: it is the attention node's
fallback for rows the group cannot carry.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import torch
import torch.distributed as dist

from moemesh import metrics
from moemesh.errors import FailedPreconditionError, InvalidRequestError, MoemeshError, UnavailableError
from moemesh.wire.status import abort

from moemesh.wire import p2p, p2p_groups
from moemesh.logs import get_logger
from moemesh.v1 import torch_transport_pb2, torch_transport_pb2_grpc

from .torch_checks import FrameChecks, Hosted as _Hosted, Tally as _Tally, Zeros as _Zeros
from .server import HIDDEN_DTYPES, MESSAGES_OK, BadRequest, DispatchService, _count_tokens

log = get_logger("moemesh.expert_node.torch")

MIN_TIMEOUT_S, MAX_TIMEOUT_S = 0.1, 600.0
IDLE_PINGS = 6  # a peer silent for this many ping intervals is gone


class _Session:
    """One pair group with one attention node, served on its own thread."""

    def __init__(self, svc: DispatchService, store: str, prefix: str, backend: str, peer_host: str,
                 timeout_s: float, idle_s: float, version: int, device: torch.device = torch.device("cpu")):
        self.svc, self.store, self.prefix, self.backend = svc, store, prefix, backend
        self.peer_host, self.timeout_s, self.idle_s, self.version = peer_host, timeout_s, idle_s, version
        # frames: on the node's device with NCCL (device to device), in host memory with gloo
        self.device = device if backend == "nccl" else torch.device("cpu")
        self.compute = getattr(svc.shard, "device", self.device)  # where the shard's weights are
        self.inline_bytes = p2p.INLINE_BYTES if backend in p2p.HOST_BACKENDS else 0  # NCCL needs equal sizes at both ends
        self.stopping = threading.Event()
        self.busy = False  # between a header and its reply
        self.error: MoemeshError | None = None  # why the session ended, typed (moemesh.wire.status maps it)
        self.messages = 0
        self.done = threading.Event()
        self._on_done: Callable[[], None] | None = None
        self.thread = threading.Thread(target=self._run, name=f"torch-session-{prefix}", daemon=True)

    def start(self, on_done: Callable[[], None]) -> None:
        self._on_done = on_done
        self.thread.start()

    def _run(self) -> None:
        try:
            hostname = p2p_groups.local_host_toward(self.peer_host)
            # A store client of our own: one TCPStore object blocks its other users while a rendezvous waits.
            store = p2p_groups.connect_store(self.store, self.timeout_s)
            req_pg, rep_pg = p2p_groups.new_pair_group(store, self.prefix, p2p.EXPERT_RANK, self.backend,
                                                self.timeout_s, hostname, self.device)
            log.info("torch_session_up", prefix=self.prefix, backend=self.backend, peer=self.peer_host,
                     version=self.version)
            if self.backend == "tcp":
                self._serve_stream(req_pg)
            else:
                self._serve(req_pg, rep_pg)
        except BadRequest as exc:
            metrics.EXPERT_MESSAGES.labels("invalid").inc()
            log.warning("bad_torch_frame", prefix=self.prefix, error=str(exc))
            self.error = exc
        except p2p.P2PError as exc:
            self.error = UnavailableError(str(exc))
        except Exception as exc:  # the shard failed: end this group, the peer falls back to gRPC
            log.exception("torch_session_failed", prefix=self.prefix)
            self.error = MoemeshError(f"{type(exc).__name__}: {exc}")  # INTERNAL
        finally:
            req_pg = rep_pg = None  # noqa: F841 - the groups' last references: their sockets close now
            log.info("torch_session_down", prefix=self.prefix, messages=self.messages,
                     error=str(self.error) if self.error else None)
            self.done.set()
            if self._on_done is not None:
                self._on_done()

    def _serve(self, req_pg, rep_pg) -> None:
        backend, src = self.backend, p2p.ATTN_RANK
        frame = torch.empty(p2p.HEADER_BYTES + self.inline_bytes, dtype=torch.uint8, device=self.device)
        host = self.device.type == "cpu"
        raw = frame.numpy() if host else None  # host frames are read through one numpy view (p2p.host_body)
        sending = None  # (work, buffer) of the last reply: waited for before the next one is sent, and at the end
        try:
            while not self.stopping.is_set():
                p2p_groups.wait(req_pg.recv([frame], src, p2p.TAG_REQUEST), self.idle_s, backend, "waiting for a frame")
                received = time.monotonic_ns()  # the node's own clock: the reply carries durations only
                h = p2p.unpack_header(raw if host else frame)
                if h.kind == p2p.KIND_PING:
                    continue
                if h.kind == p2p.KIND_BYE:
                    return
                self.busy = True
                self._check_header(h)
                if h.kind == p2p.KIND_INLINE:
                    body = raw[p2p.HEADER_BYTES:] if host else frame[p2p.HEADER_BYTES:]
                else:
                    body = torch.empty(h.body_bytes, dtype=torch.uint8, device=self.device)
                    p2p_groups.wait(req_pg.recv([body], src, p2p.TAG_REQUEST), self.timeout_s, backend, "receiving a body")
                    body = body.numpy() if host else body
                if host:  # views of the received bytes; ids and weights are small copies, checked before math
                    x, idx, w, ids, weights = p2p.host_body(body, h)
                    self._check_rows(h.layer, ids, weights)
                else:
                    _, ids, weights = p2p.unpack_body(body, h)  # host copies of ids and weights: validated first
                    self._check_rows(h.layer, ids, weights)
                    x, idx, w = p2p.body_tensors(body, h)  # on the frame's device: the rows stay there
                parsed = time.monotonic_ns()
                # The shard computes on its own device; the ids were checked on their host copy just above.
                # (On NCCL nothing waits for the kernels here: compute_ns is then their launch, not their run.)
                y = self.svc.shard.forward(h.layer, x.to(self.compute), idx.to(self.compute), w.to(self.compute),
                                           host_ids=ids)  # [T, D]
                computed = time.monotonic_ns()
                reply = p2p.pack_reply(h.msg_id, y.to(device=self.device, dtype=x.dtype), 0, parsed - received,
                                       computed - parsed, started_ns=computed)
                if sending is not None:
                    p2p_groups.wait(sending[0], self.timeout_s, backend, "sending a reply")
                sending = (rep_pg.send([reply], src, p2p.TAG_REPLY), reply)
                MESSAGES_OK.inc()
                self.svc.tokens_computed += _count_tokens(h.layer, ids)  # Info's count, as over gRPC
                self.messages += 1
                self.busy = False
        finally:
            if sending is not None and self.error is None:
                p2p_groups.wait(sending[0], self.timeout_s, backend, "sending a reply")  # delivered before the group goes

    def _serve_stream(self, pair) -> None:
        """The ``tcp`` backend's loop, on this thread alone: receive (one read), check, compute, send (one write).

        Every message is a view of the pair's receive buffer: the rows are computed from the received bytes in
        place, and the reply goes out as its prefix and the result's own memory. Checks are O(1) work per id
        (in C when the pair's C frame loop is here: ``pair.native``; numpy passes otherwise). Prometheus counts
        are added up here and published at most every ``torch_checks.TALLY_S`` (and on pings and at the end)."""
        limit = p2p.HEADER_BYTES + self.inline_bytes
        shard, tally, zeros = self.svc.shard, _Tally(self.svc), _Zeros()
        on_host = self.compute.type == "cpu"  # else a GPU node over tcp: rows go to its device and back
        native = getattr(pair, "native", None)
        hosted = _Hosted()
        # the C receive that also checks an inline request (p2p_native.c mm_serve), when the pair has it
        fast = FrameChecks(self.svc, self.inline_bytes) if native is not None else None
        n_experts = self.svc.cfg.n_routed_experts

        def recv(timeout_s: float, max_bytes: int):
            try:
                if fast is not None and max_bytes == limit:
                    return pair.recv_checked(timeout_s, max_bytes, fast)
                return (*pair.recv_frame(timeout_s, max_bytes), -1)
            except RuntimeError as exc:  # the stream's own errors (closed, timed out, out of step)
                raise p2p.P2PError(str(exc)) from exc

        try:
            while not self.stopping.is_set():
                frame, address, routed = recv(self.idle_s, limit)
                received = time.monotonic_ns()  # the node's own clock: the reply carries durations only
                ids = None
                if routed >= 0:  # an inline request the C receive checked against the tables
                    self.busy = True
                    h = p2p.unpack_header(frame)
                    snapshot = shard.snapshot(h.layer)
                    body, address = frame[p2p.HEADER_BYTES:], address + p2p.HEADER_BYTES
                    if snapshot is not fast.snapshots[h.layer]:  # the shard changed since: check it again here
                        snapshot = self._recheck(fast, h, body)
                else:
                    if frame.nbytes < p2p.HEADER_BYTES:  # before its header is read
                        raise BadRequest(f"a frame of {frame.nbytes} bytes, shorter than the {p2p.HEADER_BYTES}-byte "
                                         "header")
                    h = p2p.unpack_header(frame)
                    if h.kind == p2p.KIND_PING:
                        tally.flush()
                        continue
                    if h.kind == p2p.KIND_BYE:
                        return
                    self.busy = True
                    snapshot = self._check_header(h)
                    if h.kind == p2p.KIND_INLINE:
                        _check_length(frame.nbytes, p2p.HEADER_BYTES + h.body_bytes, "frame")
                        body, address = frame[p2p.HEADER_BYTES:], address + p2p.HEADER_BYTES
                    else:
                        _check_length(frame.nbytes, p2p.HEADER_BYTES, "header frame")
                        body, address, _ = recv(self.timeout_s, h.body_bytes)
                        _check_length(body.nbytes, h.body_bytes, "body")
                    n = h.rows * h.k
                    if native is not None:  # ids and weights checked in place (counted once the reply is sent)
                        routed = native.mm_check_rows(address, address + 4 * n, n, hosted.address(snapshot), n_experts)
                        if routed < 0:  # the Python checks name what is wrong
                            self._check_rows(h.layer, *p2p.host_meta(body, h), snapshot)
                            raise BadRequest("a frame failed the node's checks")  # pragma: no cover - they agree
                    else:
                        ids, weights = p2p.host_meta(body, h)  # views of the received bytes, no copy
                        self._check_rows(h.layer, ids, weights, snapshot)
                        routed = bool((ids >= 0).any())
                parsed = time.monotonic_ns()
                if routed:
                    if ids is None:
                        ids, weights = p2p.host_meta(body, h)
                    x = p2p.host_rows(body, h)  # a view too: computed from where it landed
                    idx, w = torch.from_numpy(ids), torch.from_numpy(weights)
                    if on_host:
                        y = shard.forward(h.layer, x, idx, w, host_ids=ids, snapshot=snapshot)  # checked above
                    else:
                        y = shard.forward(h.layer, x.to(self.compute), idx.to(self.compute), w.to(self.compute),
                                          host_ids=ids, snapshot=snapshot).cpu()
                    if y.dtype != x.dtype or not y.is_contiguous():
                        y = y.to(dtype=x.dtype).contiguous()
                else:  # every assignment is computed elsewhere (forward's own shortcut): zeros, without torch
                    y = zeros.of(h.rows * h.hidden * h.dtype.itemsize)
                computed = time.monotonic_ns()
                # native: the routed ids go to Prometheus's tally in the reply's C call, once it is sent; a request
                # the node fails to compute or answer is never counted (the attention node resends it over gRPC)
                count = _NO_COUNT
                if routed and native is not None:
                    count = (address, h.rows * h.k, tally.counts_address(h.layer), n_experts)
                try:
                    pair.send_reply((h.msg_id, 0, parsed - received, computed - parsed, time.monotonic_ns() - computed), y,
                                    count)
                except RuntimeError as exc:
                    raise p2p.P2PError(str(exc)) from exc
                if native is None:
                    tally.add(h.layer, ids)
                else:
                    tally.counted(routed)
                self.messages += 1
                self.busy = False
        finally:
            tally.flush()

    def _recheck(self, fast: FrameChecks, h: p2p.Header, body: np.ndarray):
        """A request the C receive checked against tables the shard has changed since (a reload, a drop): checked
        again against the layer's snapshot now, which it returns (BadRequest if it fails: nothing was counted)."""
        fast.refresh()
        snapshot = self._check_header(h)
        self._check_rows(h.layer, *p2p.host_meta(body, h), snapshot)
        return snapshot

    # ---- validation: what DispatchService.parse checks, on frames ---------
    def _check_header(self, h: p2p.Header):
        """The layer's snapshot of the shard (what the rows are checked against and computed with)."""
        cfg = self.svc.cfg
        if h.kind not in (p2p.KIND_DISPATCH, p2p.KIND_INLINE):
            raise BadRequest(f"unknown frame kind {h.kind}")
        snapshot = self.svc.shard.snapshot(h.layer)
        if snapshot is None:
            raise BadRequest(f"layer {h.layer} has no experts on this node (hosted MoE layers: "
                             f"{sorted(self.svc.shard.hosted()) or 'none'})")
        if h.dtype not in HIDDEN_DTYPES:
            raise BadRequest(f"hidden dtype {h.dtype} is not one of {', '.join(map(str, HIDDEN_DTYPES))}")
        if h.hidden != cfg.hidden_size:
            raise BadRequest(f"hidden has {h.hidden} columns; this model's hidden_size is {cfg.hidden_size}")
        if not 1 <= h.k <= cfg.num_experts_per_tok:
            raise BadRequest(f"k = {h.k}; this model routes each row to 1..{cfg.num_experts_per_tok} experts")
        if h.rows < 1 or h.body_bytes > p2p.MAX_BODY_BYTES:
            raise BadRequest(f"{h.rows} rows: the body must be 1 row to {p2p.MAX_BODY_BYTES} bytes")
        if h.kind == p2p.KIND_INLINE and h.body_bytes > self.inline_bytes:
            raise BadRequest(f"an inline body of {h.body_bytes} bytes; this session carries at most "
                             f"{self.inline_bytes} in a frame")
        return snapshot

    def _check_rows(self, layer: int, ids: np.ndarray, w: np.ndarray, snapshot=None) -> None:
        """Ids in range and hosted in ``snapshot`` (default: the layer's now), finite weights; numpy passes only:
        the snapshot's ``accepts`` table answers range and hosting in one gather (see ExpertShard)."""
        snapshot = snapshot if snapshot is not None else self.svc.shard.snapshot(layer)
        if not snapshot.accepts_ids(ids):
            n = self.svc.cfg.n_routed_experts
            if ids.min() < -1 or ids.max() >= n:
                raise BadRequest(f"expert ids must be in 0..{n - 1} (or -1 = skip)")
            routed = ids[ids >= 0]
            foreign = routed[~snapshot.hosted[routed]]
            raise BadRequest(f"layer {layer}: experts {np.unique(foreign)[:8].tolist()} are not hosted on this node")
        if not np.isfinite(w).all():
            raise BadRequest("topk_weights contain NaN or infinity")


_NO_COUNT = (0, 0, 0, 0)  # send_reply's count when nothing is routed here (or the caller counts: the Python path)


def _check_length(got: int, want: int, what: str) -> None:
    if got != want:
        raise BadRequest(f"a {what} of {got} bytes where its header says {want}")


class TorchTransportService(torch_transport_pb2_grpc.TorchTransportServicer):
    """Session calls over a TCPStore this node hosts; ``dispatch()`` gives the loaded DispatchService or None."""

    def __init__(self, dispatch: Callable[[], DispatchService | None], advertise_host: str, store_port: int = 0,
                 device: torch.device | str = "cpu"):
        self._dispatch = dispatch
        self.device = torch.device(device)  # the expert node's --device: NCCL frames live there
        self.store = p2p_groups.host_store(store_port)
        self.store_address = f"{advertise_host}:{self.store.port}"
        self.sessions: dict[str, _Session] = {}  # open Session calls
        self._threads: set[_Session] = set()  # sessions whose thread still holds a group
        self._draining = asyncio.Event()

    def drain(self) -> None:
        """Refuse new sessions; end each open one after its in-flight frame."""
        self._draining.set()

    async def wait_closed(self, timeout_s: float) -> bool:
        """After drain: wait until every group is gone (its peer closes it on seeing the session end).

        A process must not exit while a session thread still holds a group: torch.distributed torn down
        under it aborts the process. True when all are gone within ``timeout_s``."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._threads and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        return not self._threads

    async def Session(self, request, context):
        svc = self._dispatch()
        if svc is None:
            await abort(context, UnavailableError("experts are still loading; retry when health is SERVING"))
        if self._draining.is_set():
            await abort(context, UnavailableError("expert node is draining"))
        backend = request.backend or "gloo"  # a peer that does not say is one from before the tcp backend
        if backend == "nccl" and not (dist.is_nccl_available() and self.device.type == "cuda"):
            await abort(context, FailedPreconditionError(
                f"nccl asked for, but this expert node runs on {self.device}"
                f"{'' if dist.is_nccl_available() else ' without NCCL'}: use --transport grpc or --device cuda"))
        if backend not in (*p2p.HOST_BACKENDS, "nccl"):
            await abort(context, InvalidRequestError(f"backend {backend!r}: tcp, gloo or nccl"))
        if request.hidden_size != svc.cfg.hidden_size:
            await abort(context, FailedPreconditionError(
                f"hidden_size {request.hidden_size}; this expert node serves {svc.cfg.hidden_size}"))
        timeout_s = min(max(request.timeout_s or 30.0, MIN_TIMEOUT_S), MAX_TIMEOUT_S)
        idle_s = IDLE_PINGS * min(max(request.ping_interval_s or 5.0, MIN_TIMEOUT_S), MAX_TIMEOUT_S)
        prefix = f"s-{secrets.token_hex(12)}/"
        loop = asyncio.get_running_loop()
        ended = asyncio.Event()
        session = _Session(svc, f"127.0.0.1:{self.store.port}", prefix, backend, _peer_host(context.peer()),
                           timeout_s, idle_s, request.placement_version, self.device)
        self.sessions[prefix] = session
        self._threads.add(session)

        def on_done() -> None:  # on the session's thread, once its groups are dropped
            loop.call_soon_threadsafe(ended.set)
            loop.call_soon_threadsafe(self._threads.discard, session)

        try:
            session.start(on_done)
            yield torch_transport_pb2.SessionEvent(store=self.store_address, prefix=prefix, rank=p2p.ATTN_RANK,
                                                   world_size=2, backend=backend, inline_bytes=session.inline_bytes)
            waits = [asyncio.ensure_future(self._draining.wait()), asyncio.ensure_future(ended.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if not ended.is_set():  # draining: finish the frame in flight, then tell the peer
                session.stopping.set()
                for _ in range(int(timeout_s / 0.01)):
                    if not session.busy:
                        break
                    await asyncio.sleep(0.01)
                await abort(context, UnavailableError("expert node is draining"))
            if session.error is not None:
                await abort(context, session.error)
        finally:  # also when the caller cancels: the thread stops after its current frame
            session.stopping.set()
            self.sessions.pop(prefix, None)
            log.info("torch_session_closed", prefix=prefix, messages=session.messages,
                     draining=self._draining.is_set(), error=str(session.error) if session.error else None)


def _peer_host(peer: str) -> str:
    """gRPC's ``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5`` -> the host part."""
    _, _, rest = peer.partition(":")
    return rest.rpartition(":")[0].strip("[]") or "127.0.0.1"


def attach(server: grpc.aio.Server, dispatch: Callable[[], DispatchService | None], advertise_host: str,
           store_port: int = 0, device: torch.device | str = "cpu") -> TorchTransportService:
    """Add the TorchTransport service to a not yet started server; returns it (``.store_address``, ``.drain()``).

    ``device``: the expert node's ``--device`` (its shard's); NCCL sessions put their frames there."""
    service = TorchTransportService(dispatch, advertise_host, store_port, device)
    torch_transport_pb2_grpc.add_TorchTransportServicer_to_server(service, server)
    log.info("torch_transport", store=service.store_address)
    return service
