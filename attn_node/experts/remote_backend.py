"""The gRPC expert backend: routed experts computed on expert nodes over long-lived Dispatch streams.

Per MoE layer, ``dispatch`` picks a replica for every (row, expert) assignment
(rows of a replicated expert are split across its live replicas), groups rows by
destination node and sends one message per node on that node's stream, all at
once; it returns without waiting. ``combine`` waits for the partial rows and
sums them. If a node dies or misses the deadline, its assignments go to another
live replica of the same experts; when an expert has none left, the step fails
with :class:`ExpertsUnavailable` naming the experts. It never hangs: every wait
has a deadline.

Glossary: T rows, D hidden, K experts per token, E routed experts, N nodes.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh import metrics
from moemesh.wire.codec import from_proto, to_proto
from moemesh.model.config import ModelConfig
from moemesh.expert_backend import ExpertBackendError, StaticExpertBackend
from moemesh.logs import get_logger
from moemesh.control.placement import Placement, describe_missing
from moemesh.wire.tls import TLSFiles
from moemesh.wire.tls import channel as tls_channel
from moemesh.v1 import dispatch_pb2, dispatch_pb2_grpc

from .replica_routes import ExpertsUnavailable, ReplicaRoutes

log = get_logger("moemesh.attn_node.remote")

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]




class NodeFailure(Exception):
    def __init__(self, address: str, reason: str):
        super().__init__(f"expert node {address}: {reason}")
        self.address = address


class NodeLink:
    """One long-lived Dispatch stream to one expert node; responses resolve futures by message id."""

    def __init__(self, address: str, connect_timeout_s: float = 10.0, tls: TLSFiles | None = None):
        self.address = address
        self.failure: str | None = None
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
        self._call = self.stub.Dispatch(self._requests())
        threading.Thread(target=self._read, name=f"dispatch-{address}", daemon=True).start()

    def info(self, timeout_s: float = 10.0) -> dispatch_pb2.InfoResponse:
        return self.stub.Info(dispatch_pb2.InfoRequest(), timeout=timeout_s)

    def send(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, version: int) -> Future:
        fut: Future = Future()
        fut.expected_shape = tuple(x.shape)  # a reply of any other shape fails the link, not the engine
        msg_id = next(self._ids)
        with self._lock:
            if self.failure is not None:
                fut.set_exception(NodeFailure(self.address, self.failure))
                return fut
            self._pending[msg_id] = fut
        self._outbox.put(dispatch_pb2.DispatchRequest(
            id=msg_id, layer=layer, hidden=to_proto(x), topk_idx=to_proto(idx), topk_weights=to_proto(w),
            placement_version=version,
        ))
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
                    y = from_proto(resp.output)
                    if tuple(y.shape) != fut.expected_shape:
                        raise ValueError(f"reply {resp.id} has shape {tuple(y.shape)}, expected {fut.expected_shape}")
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
        self._outbox.put(None)
        self._call.cancel()
        self._channel.close()


@dataclass
class _Send:
    node: int
    rows: torch.Tensor  # [R] rows of x in this message
    idx: torch.Tensor  # [R, K] expert ids for this node, -1 elsewhere
    weights: torch.Tensor  # [R, K]
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
                 checkpoint: str = ""):
        placement.require_complete(cfg.moe_layers, cfg.n_routed_experts)
        self.cfg, self.placement, self.timeout_s = cfg, placement, timeout_s
        self.links: list[NodeLink] = []
        # link_factory(address, connect_timeout_s, tls) -> a NodeLink-like link (attn_node/experts/torch_link.py: torch_links)
        make_link = link_factory or NodeLink
        try:
            for node, address in enumerate(placement.nodes):
                self.links.append(make_link(address, connect_timeout_s, tls))
                _check_node(self.links[-1], cfg, placement, node, checkpoint)
        except BaseException:
            self.close()  # no half-open mesh: channels and reader threads of the nodes reached so far
            raise
        self.routes = ReplicaRoutes(cfg.moe_layers, cfg.n_routed_experts, placement)
        self._rebuild_tables()

    def reroute(self, placement: Placement) -> None:
        """Take a placement that only changes replicas' shares (same nodes, same replicas): no new links.

        A periodic rebalance often moves nothing but shares; re-dialling every node (and re-forming torch
        groups) for that would be wasted work.
        """
        if placement.nodes != self.placement.nodes or placement.replicas != self.placement.replicas:
            raise ValueError("reroute takes only a placement with the same nodes and replicas; build a new backend")
        routes = ReplicaRoutes(self.cfg.moe_layers, self.cfg.n_routed_experts, placement)
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
        nodes = self._assign(handle.layer, idx)  # [R, K]
        for node in torch.unique(nodes[nodes >= 0]).tolist():
            mine = nodes == node  # [R, K]
            sel = mine.any(dim=1).nonzero().squeeze(1)  # rows with work for this node
            node_idx = torch.where(mine, idx, -1)[sel]
            node_w = w[sel]
            x_rows = sel if rows is None else rows[sel]
            fut = self.links[node].send(handle.layer, handle.x[x_rows], node_idx, node_w, self.placement.version)
            handle.sends.append(_Send(node, x_rows, node_idx, node_w, fut, time.monotonic() + self.timeout_s))

    def combine(self, handle: _Handle) -> torch.Tensor:
        out = torch.zeros_like(handle.x)  # [T, D]
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
            out.index_add_(0, send.rows, y.to(out.dtype))
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
