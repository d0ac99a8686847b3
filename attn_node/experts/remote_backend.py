"""The gRPC expert backend: routed experts computed on expert nodes over long-lived Dispatch streams.

Per MoE layer, ``dispatch`` picks a replica for every (row, expert) assignment
(rows of a replicated expert are split across its live replicas), groups rows by
destination node and sends one message per node on that node's stream, all at
once; it returns without waiting.

No host sync in that assembly: which nodes a layer can reach is known on the host
(the placement), and each node's message is built with device ops of static shape:
all T rows, those with work for the node first (a stable partition, no
``nonzero``), ids of experts routed elsewhere set to -1. The link decides what
crosses: the gRPC link copies the message to pinned host memory in one transfer
per node per layer (the inherent sync of a host transport), reads there how many
leading rows have work and sends only those; the NCCL link sends all T rows
device to device and the expert node skips the -1 ids. A reply has the first n
<= T rows of the message; ``combine`` puts them back in row order and sums on the
device. ``combine`` waits for the partial rows and
sums them. If a node dies or misses the deadline, its assignments go to another
live replica of the same experts; when an expert has none left, the step fails
with :class:`ExpertsUnavailable` naming the experts. It never hangs: every wait
has a deadline.

Glossary: T rows, D hidden, K experts per token, E routed experts, N nodes.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh import metrics
from moemesh.wire.codec import from_proto, to_proto
from moemesh.model.config import ModelConfig
from moemesh.expert_backend import ExpertBackendError, StaticExpertBackend
from moemesh.logs import get_logger
from moemesh.control.placement import Placement, describe_missing
from moemesh.wire.limits import EXPERT_CLIENT_MAX_BYTES, client_options, dispatch_rows_within
from moemesh.wire.tls import TLSFiles
from moemesh.wire.tls import channel as tls_channel
from moemesh.v1 import dispatch_pb2, dispatch_pb2_grpc

from .hop_stats import HopRecorder
from .replica_routes import ExpertsUnavailable, ReplicaRoutes

log = get_logger("moemesh.attn_node.remote")

CHANNEL_OPTIONS = client_options("expert")  # sizes and keepalive: moemesh/wire/limits.py




class NodeFailure(Exception):
    def __init__(self, address: str, reason: str):
        super().__init__(f"expert node {address}: {reason}")
        self.address = address


def _gather(whole: Future, parts: list[Future]) -> None:
    """``whole`` resolves to the parts' rows in order once every part has, or to the first part's failure."""
    lock = threading.Lock()  # parts resolve on the reader thread, and fail() may fail them from another

    def done(_: Future) -> None:
        with lock:
            if whole.done():
                return
            failed = next((p for p in parts if p.done() and p.exception() is not None), None)
            if failed is not None:
                whole.set_exception(failed.exception())
            elif all(p.done() for p in parts):
                whole.set_result(torch.cat([p.result() for p in parts]))  # [n, D] on the link's device

    for part in parts:
        part.add_done_callback(done)


def _copy_done(device: torch.device) -> None:
    """Block until the copies queued so far on ``device``'s current stream are done (one event wait)."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    event.synchronize()


class HostStaging:
    """A reusable pinned host buffer: one message's device tensors cross to host memory in ONE copy.

    The tensors are packed into one device buffer (largest element size first, so every part's offset is
    aligned for its dtype), copied into the pinned buffer without blocking, and that copy is waited for:
    the one sync a host transport cannot avoid. Used under ``with``: the views are valid until it exits.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._buf: torch.Tensor | None = None  # uint8, pinned, grown to the largest message seen
        self._lock = threading.Lock()  # one message in the buffer at a time

    def __call__(self, *tensors: torch.Tensor):
        return _Staged(self, tensors)

    def _copy(self, tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        order = sorted(range(len(tensors)), key=lambda i: -tensors[i].dtype.itemsize)
        parts = [_flat_bytes(tensors[i].detach()) for i in order]
        packed = torch.cat(parts)  # [B] uint8 on the device
        nbytes = packed.numel()
        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = torch.empty(1 << max(12, math.ceil(math.log2(max(nbytes, 1)))), dtype=torch.uint8,
                                    pin_memory=True)
        host = self._buf[:nbytes]
        host.copy_(packed, non_blocking=True)
        _copy_done(packed.device)
        views: list[torch.Tensor | None] = [None] * len(tensors)
        offset = 0
        for i, part in zip(order, parts):
            t = tensors[i]
            views[i] = host[offset:offset + part.numel()].view(t.dtype).view(t.shape)
            offset += part.numel()
        return views


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """[numel * itemsize] uint8 view of ``t`` (a copy only if it is not contiguous)."""
    if not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t.reshape(-1).view(torch.uint8)


class _Staged:
    def __init__(self, staging: HostStaging | None, tensors: tuple[torch.Tensor, ...]):
        self.staging, self.tensors = staging, tensors

    def __enter__(self) -> list[torch.Tensor]:
        if self.staging is None:  # host tensors already
            return list(self.tensors)
        self.staging._lock.acquire()
        try:
            return self.staging._copy(self.tensors)
        except BaseException:
            self.staging._lock.release()
            raise

    def __exit__(self, *exc) -> None:
        if self.staging is not None:
            self.staging._lock.release()


def rows_with_work(ids: np.ndarray) -> int:
    """How many leading rows of a message to send: up to the last row with an expert id >= 0.

    The backend puts a node's rows with work first, so the rest are all -1 and need not cross."""
    work = (ids >= 0).any(axis=1)  # [T]
    return 0 if not work.any() else len(work) - int(np.argmax(work[::-1]))


class NodeLink:
    """One long-lived Dispatch stream to one expert node; responses resolve futures by message id.

    ``device``: where the model's tensors live (given once). On a device, each message crosses to host memory
    in one copy (:class:`HostStaging`) and each reply is uploaded back in one copy; on the CPU neither happens.
    """

    def __init__(self, address: str, connect_timeout_s: float = 10.0, tls: TLSFiles | None = None, *,
                 device: torch.device | str = "cpu"):
        self.address = address
        self.device = torch.device(device)
        self._staging = HostStaging(self.device) if self.device.type != "cpu" else None
        self.failure: str | None = None
        # the largest message sent: this channel's limit until Info tells the node's own (set by info())
        self.max_message_bytes = EXPERT_CLIENT_MAX_BYTES
        self._channel = tls_channel(address, tls, CHANNEL_OPTIONS)
        try:
            _wait_serving(self._channel, address, connect_timeout_s)
        except Exception:
            self._channel.close()
            raise
        self.stub = dispatch_pb2_grpc.ExpertDispatchStub(self._channel)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.hops = HopRecorder(address)
        self._call = self.stub.Dispatch(self._requests())
        threading.Thread(target=self._read, name=f"dispatch-{address}", daemon=True).start()

    def info(self, timeout_s: float = 10.0) -> dispatch_pb2.InfoResponse:
        """The node's Info; its message limit (0: a node that does not say) bounds the messages sent after."""
        info = self.stub.Info(dispatch_pb2.InfoRequest(), timeout=timeout_s)
        if info.max_message_bytes:
            self.max_message_bytes = min(info.max_message_bytes, EXPERT_CLIENT_MAX_BYTES)
        return info

    def send(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, version: int,
             trim: bool = False) -> Future:
        """Send rows of ``x`` with their ids and weights; the future's result is the partial rows, on ``device``.

        ``trim``: send only the leading rows up to the last one with work (the backend puts those first); the
        result has that many rows, and with none no message is sent. Rows beyond the node's message limit (a
        step larger than its --max-batched-tokens) go in several messages, their replies joined in order."""
        fut: Future = Future()
        sent_at = time.monotonic()  # the hop is timed from here: staging and encoding are part of it
        with _Staged(self._staging, (x, idx, w)) as (hx, hidx, hw):
            n = rows_with_work(hidx.numpy()) if trim else x.shape[0]
            if n == 0:
                fut.set_result(torch.zeros((0, x.shape[1]), dtype=x.dtype, device=x.device))
                return fut
            step = dispatch_rows_within(self.max_message_bytes, x.shape[1], idx.shape[1], x.element_size())
            # encoded inside the with: the host views live in the reusable staging buffer
            cuts = [(a, min(a + step, n)) for a in range(0, n, step)]
            reqs = [dispatch_pb2.DispatchRequest(layer=layer, hidden=to_proto(hx[a:b]), topk_idx=to_proto(hidx[a:b]),
                                                 topk_weights=to_proto(hw[a:b]), placement_version=version)
                    for a, b in cuts]
        parts = [fut] if len(reqs) == 1 else [Future() for _ in reqs]
        for (a, b), part in zip(cuts, parts):
            part.expected_shape = (b - a, x.shape[1])  # a reply of any other shape fails the link, not the engine
            part.sent_at = sent_at
        if len(parts) > 1:
            _gather(fut, parts)
        with self._lock:
            if self.failure is not None:
                fut.set_exception(NodeFailure(self.address, self.failure))
                return fut
            for req, part in zip(reqs, parts):
                req.id = next(self._ids)
                self._pending[req.id] = part
        for req in reqs:
            self._outbox.put(req)
        return fut

    def _requests(self):
        while (req := self._outbox.get()) is not None:
            yield req

    def _read(self) -> None:
        try:
            for resp in self._call:
                with self._lock:
                    fut = self._pending.pop(resp.id, None)
                if fut is not None:
                    y = from_proto(resp.output, device=self.device)  # on a device: the reply's one upload
                    if tuple(y.shape) != fut.expected_shape:
                        raise ValueError(f"reply {resp.id} has shape {tuple(y.shape)}, expected {fut.expected_shape}")
                    self.hops.record(time.monotonic() - fut.sent_at, resp.receive_ns, resp.compute_ns, resp.send_ns)
                    fut.set_result(y)
            self.fail("its stream ended (node drained or stopped)")
        except grpc.RpcError as exc:
            self.fail(f"{exc.code().name}: {exc.details()}")
        except Exception as exc:  # a malformed response must not leave callers waiting
            self.fail(f"bad response: {exc}")

    def fail(self, reason: str) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = reason
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(NodeFailure(self.address, reason))

    def close(self) -> None:
        self.fail("closed by the attention node")
        self.hops.flush()
        self._outbox.put(None)
        self._call.cancel()
        self._channel.close()


@dataclass
class _Send:
    node: int
    rows: torch.Tensor  # [T] message slot -> row of x (a permutation: rows with work for the node first)
    slot: torch.Tensor  # [T] row of x -> message slot (the inverse permutation)
    idx: torch.Tensor  # [T, K] expert ids for this node, -1 elsewhere, in message order
    weights: torch.Tensor  # [T, K] in message order
    future: Future
    deadline: float  # monotonic time by which the node must answer


@dataclass
class _Handle:
    layer: int
    x: torch.Tensor  # [T, D]
    sends: list[_Send]
    started: float = 0.0


class RemoteExpertBackend(StaticExpertBackend):
    """One placement, fixed for the backend's life (a new version is a new backend): the step hooks are no-ops;
    failover within the placement happens in ``combine``."""

    def __init__(self, cfg: ModelConfig, placement: Placement, timeout_s: float = 30.0,
                 connect_timeout_s: float = 10.0, tls: TLSFiles | None = None, link_factory=None,
                 checkpoint: str = "", device: torch.device | str = "cpu"):
        placement.require_complete(cfg.moe_layers, cfg.n_routed_experts)
        self.cfg, self.placement, self.timeout_s = cfg, placement, timeout_s
        self.device = torch.device(device)  # the model's: routing tables live there
        self.links: list[NodeLink] = []
        # link_factory(address, connect_timeout_s, tls) -> a NodeLink-like link (attn_node/experts/torch_link.py:
        # links_for); its links must take the same device
        make_link = link_factory or (lambda a, c, t: NodeLink(a, c, t, device=self.device))
        try:
            for node, address in enumerate(placement.nodes):
                self.links.append(make_link(address, connect_timeout_s, tls))
                _check_node(self.links[-1], cfg, placement, node, checkpoint)
        except BaseException:
            self.close()  # no half-open mesh: channels and reader threads of the nodes reached so far
            raise
        self.routes = ReplicaRoutes(cfg.moe_layers, cfg.n_routed_experts, placement, self.device)
        self._rebuild_tables()

    def reroute(self, placement: Placement) -> None:
        """Take a placement that only changes replicas' shares (same nodes, same replicas): no new links.

        A periodic rebalance often moves nothing but shares; re-dialling every node (and re-forming torch
        groups) for that would be wasted work.
        """
        if placement.nodes != self.placement.nodes or placement.replicas != self.placement.replicas:
            raise ValueError("reroute takes only a placement with the same nodes and replicas; build a new backend")
        routes = ReplicaRoutes(self.cfg.moe_layers, self.cfg.n_routed_experts, placement, self.device)
        routes.rebuild({n for n, link in enumerate(self.links) if link.failure is None})
        self.placement, self.routes = placement, routes  # attribute swaps: a concurrent dispatch sees old or new

    def _rebuild_tables(self) -> None:
        self.routes.rebuild({n for n, link in enumerate(self.links) if link.failure is None})

    def _assign(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        return self.routes.assign(layer, idx)

    # ---- the backend interface -----------------------------------------
    def dispatch(self, layer_id: int, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor):
        handle = _Handle(layer_id, x, [], time.monotonic())
        self._send(handle, topk_idx, topk_weights)
        return handle

    def _send(self, handle: _Handle, idx: torch.Tensor, w: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """One message per node the layer can reach; device ops of static shape, no host read.

        ``rows`` [T]: which row of x each row of ``idx`` is (a resend after a failure); None = row t is row t."""
        t, k = idx.shape
        if t == 0:
            return
        nodes = self._assign(handle.layer, idx)  # [T, K]
        reach = self.routes.nodes_of(handle.layer)  # the M nodes this layer can reach, known on the host
        mine = nodes.unsqueeze(0) == self.routes.node_ids(handle.layer).view(-1, 1, 1)  # [M, T, K]
        arange = torch.arange(t, device=idx.device)  # [T]
        local, slot = _work_first(mine.any(dim=2), arange)  # [M, T] message slot -> row of idx, and back
        flat = local.reshape(-1)  # [M*T]
        x_rows = local
        if rows is not None:  # rows of idx are not rows of x: compose, and invert the composition
            x_rows = rows.index_select(0, flat).view_as(local)  # [M, T] message slot -> row of x
            slot = torch.empty_like(x_rows).scatter_(1, x_rows, arange.expand_as(x_rows))  # [M, T] row of x -> slot
        node_idx = torch.where(mine, idx, -1).gather(1, local.unsqueeze(-1).expand(-1, -1, k))  # [M, T, K]
        node_w = w.index_select(0, flat).view(-1, t, k)  # [M, T, K]
        node_x = handle.x.index_select(0, x_rows.reshape(-1)).view(-1, t, handle.x.shape[1])  # [M, T, D]
        deadline = time.monotonic() + self.timeout_s
        # unbind, not [m]: per-node views without Python indexing
        for node, xm, im, wm, rm, sm in zip(reach, node_x.unbind(0), node_idx.unbind(0), node_w.unbind(0),
                                             x_rows.unbind(0), slot.unbind(0)):
            fut = self.links[node].send(handle.layer, xm, im, wm, self.placement.version, trim=True)
            handle.sends.append(_Send(node, rm, sm, im, wm, fut, deadline))

    def combine(self, handle: _Handle) -> torch.Tensor:
        out = torch.zeros_like(handle.x)  # [T, D]
        t = out.shape[0]
        pending = list(handle.sends)
        while pending:
            send = pending.pop(0)
            try:
                y = send.future.result(timeout=max(0.0, send.deadline - time.monotonic()))
            except (NodeFailure, FutureTimeout) as exc:
                self._lose(send.node, str(exc) or f"missed the {self.timeout_s:g}s dispatch deadline")
                handle.sends = []
                self._send(handle, send.idx, send.weights, rows=send.rows)  # to other replicas, or raise
                pending.extend(handle.sends)
                continue
            y = y.to(out.dtype)  # [n, D]: the message's first n rows (the rest had no work for the node)
            if y.shape[0] < t:
                y = torch.cat([y, y.new_zeros(t - y.shape[0], y.shape[1])])  # [T, D]
            out += y.index_select(0, send.slot)  # back in row order, summed on the device
        metrics.DISPATCH_LATENCY.labels("attn").observe(time.monotonic() - handle.started)
        return out

    def _lose(self, node: int, reason: str) -> None:
        link = self.links[node]
        if link.failure is None:
            log.warning("expert_node_lost", node=link.address, reason=reason)
            link.fail(reason)
        self._rebuild_tables()

    def close(self) -> None:
        for link in self.links:
            link.close()


def _work_first(has: torch.Tensor, arange: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per node, a stable partition of T rows, those with ``has`` [M, T] first:
    (order [M, T] slot -> row, slot [M, T] row -> slot).

    cumsum and scatter: static shapes, so no host read (``nonzero`` would need the count on the host)."""
    c = has.long().cumsum(1)  # [M, T] rows with work up to and including each row
    count = c.narrow(1, c.shape[1] - 1, 1)  # [M, 1] rows with work per node
    slot = torch.where(has, c - 1, count + arange - c)  # [M, T] with work: its rank; without: after them
    return torch.empty_like(slot).scatter_(1, slot, arange.expand_as(slot)), slot


def _wait_serving(channel: grpc.Channel, address: str, timeout_s: float) -> None:
    """Block until the node's health says SERVING (its port opens before its weights are loaded)."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=max(0.1, deadline - time.monotonic()))
            if status.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        time.sleep(0.1)
    raise ExpertsUnavailable(f"expert node {address} was not SERVING within {timeout_s:g}s (last: {last})")


def _check_node(link: NodeLink, cfg: ModelConfig, placement: Placement, node: int, checkpoint: str = "") -> None:
    """Fail fast on a node that serves another model or lacks experts the placement gives it."""
    try:
        info = link.info()
    except grpc.RpcError as exc:
        raise ExpertsUnavailable(f"expert node {link.address}: {exc.code().name}: {exc.details()}") from None
    if info.hidden_size != cfg.hidden_size or info.n_routed_experts != cfg.n_routed_experts:
        raise ExpertBackendError(
            f"expert node {link.address} serves a model with hidden_size {info.hidden_size} and "
            f"{info.n_routed_experts} experts; this one has {cfg.hidden_size} and {cfg.n_routed_experts}"
        )
    if checkpoint and info.checkpoint and info.checkpoint != checkpoint:
        raise ExpertBackendError(
            f"expert node {link.address} serves checkpoint {info.checkpoint}, this attention node {checkpoint}: "
            "same shape, other weights; point both at the same model directory (or finish the roll-out)")
    hosted = {(le.layer, e) for le in info.experts for e in le.experts}
    claimed = {key for key, nodes in placement.replicas.items() if node in nodes}
    lacking = sorted(claimed - hosted)
    if lacking:
        by_layer: dict[int, list[int]] = {}
        for layer, e in lacking:
            by_layer.setdefault(layer, []).append(e)
        raise ExpertBackendError(f"expert node {link.address} does not host {describe_missing(by_layer)}, "
                                 "which --expert-nodes assigns to it: fix its spec")
