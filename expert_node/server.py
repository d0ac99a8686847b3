"""The expert node's gRPC service: long-lived Dispatch streams over an ExpertShard.

Each request on a stream is validated in full before any math: a bad message
ends that stream with INVALID_ARGUMENT naming the problem, and every other
stream keeps being served. Shard math runs on one worker thread, so the event
loop keeps reading and writing other streams meanwhile (torch releases the GIL).

Rows arrive as host bytes. :func:`compute` moves them to the shard's device once,
runs the shard with the ids validated on the host copy (no device read), and
brings the result back once.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from moemesh import metrics
from moemesh.errors import FailedPreconditionError, InvalidRequestError
from moemesh.wire.codec import CodecError, from_proto, to_proto
from moemesh.model.config import ModelConfig
from moemesh.logs import get_logger
from moemesh.wire.limits import DEFAULT_MAX_BATCHED_TOKENS, dispatch_message_bytes
from moemesh.wire.server import create_server
from moemesh.wire.status import abort
from moemesh.wire.tls import TLSFiles
from moemesh.v1 import dispatch_pb2, dispatch_pb2_grpc, torch_transport_pb2

from .shard import ExpertShard

log = get_logger("moemesh.expert_node")

SERVICE_NAME = dispatch_pb2.DESCRIPTOR.services_by_name["ExpertDispatch"].full_name
TORCH_SERVICE_NAME = torch_transport_pb2.DESCRIPTOR.services_by_name["TorchTransport"].full_name
HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INLINE_ASSIGNMENTS = 64  # (row, expert) pairs computed on the event loop itself; more go to the worker thread


def message_limit(cfg: ModelConfig, max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS) -> int:
    """The node's message limit: one MoE layer's rows of the largest step an attention node sends (one message
    per node per layer, at most ``max_batched_tokens`` rows), in the widest hidden dtype it accepts."""
    return dispatch_message_bytes(max_batched_tokens, cfg.hidden_size, cfg.num_experts_per_tok)


class BadRequest(InvalidRequestError):
    """A Dispatch message that cannot be served; the message says why."""


class DispatchService(dispatch_pb2_grpc.ExpertDispatchServicer):
    def __init__(self, shard: ExpertShard, cfg: ModelConfig, checkpoint: str = "", max_message_bytes: int | None = None):
        self.shard, self.cfg = shard, cfg
        # its server's limit (default: steps of the attention nodes' default size), told to senders in Info
        self.max_message_bytes = max_message_bytes or message_limit(cfg)
        shard.strict = True  # see ExpertShard.strict
        self.checkpoint = checkpoint  # fingerprint of the checkpoint served (Info; attention nodes compare)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experts")
        self._draining = asyncio.Event()
        self.in_flight = 0
        self.tokens_computed = 0  # routed (token, expert) assignments, for Info and `moemesh status`
        self.placement_version = 0  # set by the control loop once a version's experts are loaded

    def drain(self) -> None:
        """Stop taking new messages; streams end after their in-flight message."""
        self._draining.set()

    def parse(self, req: dispatch_pb2.DispatchRequest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hosted = self.shard.hosted_mask(req.layer)
        if hosted is None:
            raise BadRequest(f"layer {req.layer} has no experts on this node (hosted MoE layers: "
                             f"{sorted(self.shard.hosted()) or 'none'})")
        try:
            x = from_proto(req.hidden, expect_dtypes=HIDDEN_DTYPES, expect_ndim=2, name="hidden")
            idx = from_proto(req.topk_idx, expect_dtypes=(torch.int32, torch.int64), expect_ndim=2, name="topk_idx")
            w = from_proto(req.topk_weights, expect_dtypes=(torch.float32,), expect_ndim=2, name="topk_weights")
        except CodecError as exc:
            raise BadRequest(str(exc)) from None
        if x.shape[1] != self.cfg.hidden_size:
            raise BadRequest(f"hidden has {x.shape[1]} columns; this model's hidden_size is {self.cfg.hidden_size}")
        if idx.shape[0] != x.shape[0] or w.shape != idx.shape:
            raise BadRequest(f"topk_idx {tuple(idx.shape)} and topk_weights {tuple(w.shape)} must both be "
                             f"[{x.shape[0]}, K] to match hidden's {x.shape[0]} rows")
        if idx.shape[1] > self.cfg.num_experts_per_tok:
            raise BadRequest(f"topk_idx has {idx.shape[1]} columns; this model routes each row to at most "
                             f"{self.cfg.num_experts_per_tok} experts")
        # numpy on these small arrays: a few microseconds where torch ops cost tens.
        ids = idx.numpy()
        if ids.size:
            if ids.min() < -1 or ids.max() >= self.cfg.n_routed_experts:
                raise BadRequest(f"expert ids must be in 0..{self.cfg.n_routed_experts - 1} (or -1 = skip)")
            routed = ids[ids >= 0]
            foreign = routed[~hosted[routed]]
            if foreign.size:
                raise BadRequest(f"layer {req.layer}: experts {np.unique(foreign)[:8].tolist()} are not hosted "
                                 "on this node")
        if not np.isfinite(w.numpy()).all():
            raise BadRequest("topk_weights contain NaN or infinity")
        return x, idx, w

    async def Dispatch(self, request_iterator, context):
        """Requests arrive as raw bytes (see ``handlers``) so undecodable ones get INVALID_ARGUMENT too."""
        async for raw in request_iterator:
            # In flight from the moment it is read until its reply is written: decoding a large message and
            # writing its reply take as long as the math, and a drain (finish_in_flight) must wait for all of it.
            self.in_flight += 1
            try:
                yield await self._serve_one(raw, context)
            finally:
                self.in_flight -= 1
            if self._draining.is_set():
                return

    async def _serve_one(self, raw: bytes, context) -> dispatch_pb2.DispatchResponse:
        received = time.monotonic_ns()  # the node's own clock: the reply carries durations, never instants
        req = dispatch_pb2.DispatchRequest()
        try:
            try:
                req.ParseFromString(raw)
            except DecodeError as exc:
                raise BadRequest(f"the DispatchRequest does not parse: {exc}") from None
            x, idx, w = self.parse(req)
        except BadRequest as exc:
            metrics.EXPERT_MESSAGES.labels("invalid").inc()
            log.warning("bad_dispatch", id=req.id, layer=req.layer, error=str(exc), peer=context.peer())
            await abort(context, exc)
        parsed = time.monotonic_ns()
        try:
            if idx.numel() <= INLINE_ASSIGNMENTS and self.shard.device.type == "cpu":
                # A decode-sized message costs less to compute than a thread hop would (on a CPU; a GPU's
                # copy back waits for the kernels, which must not hold up the event loop).
                y = compute(self.shard, req.layer, x, idx, w)
            else:
                y = await asyncio.get_running_loop().run_in_executor(self._worker, compute, self.shard, req.layer,
                                                                     x, idx, w)
        except ValueError as exc:  # an expert dropped between validation and math (see ExpertShard.strict)
            metrics.EXPERT_MESSAGES.labels("invalid").inc()
            log.warning("dispatch_expert_gone", id=req.id, layer=req.layer, error=str(exc))
            await abort(context, FailedPreconditionError(str(exc)))
        computed = time.monotonic_ns()
        MESSAGES_OK.inc()
        self.tokens_computed += _count_tokens(req.layer, idx.numpy())
        resp = dispatch_pb2.DispatchResponse(id=req.id, output=to_proto(y), receive_ns=parsed - received,
                                             compute_ns=computed - parsed)
        resp.send_ns = time.monotonic_ns() - computed  # encoding the rows (gRPC's own framing follows)
        return resp

    async def Info(self, request, context):
        dtype = str(self.shard.dtype).removeprefix("torch.")
        return dispatch_pb2.InfoResponse(
            model_type=self.cfg.arch,
            hidden_size=self.cfg.hidden_size,
            n_routed_experts=self.cfg.n_routed_experts,
            experts=[dispatch_pb2.LayerExperts(layer=layer, experts=ids) for layer, ids in self.shard.hosted().items()],
            dtype=dtype,
            tokens_computed=self.tokens_computed,
            placement_version=self.placement_version,
            checkpoint=self.checkpoint,
            max_message_bytes=self.max_message_bytes,
        )


def compute(shard: ExpertShard, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
            host_ids: np.ndarray | None = None) -> torch.Tensor:
    """The shard's partial rows for host tensors (validated by the caller), back on the host in x's dtype.

    One copy to the device per input and one back; the shard re-checks the ids against the layer snapshot it
    uses on their host copy (``host_ids``, default ``idx.numpy()``), so nothing reads device memory but the
    final copy.
    """
    dev = shard.device
    ids = idx.numpy() if host_ids is None else host_ids
    y = shard.forward(layer, x.to(dev), idx.to(dev), w.to(dev), host_ids=ids)  # [T, D] on dev
    return y.to("cpu", x.dtype)


_TOKEN_COUNTERS: dict[tuple[int, int], object] = {}  # (layer, expert) -> its Prometheus child: labels() per
# message and expert cost more than the message's own checks
MESSAGES_OK = metrics.EXPERT_MESSAGES.labels("ok")


def _count_tokens(layer: int, ids: np.ndarray) -> int:
    """Tokens per (layer, expert) of one message's host ids (-1 = elsewhere), the load statistic Prometheus
    scrapes; returns the total."""
    routed = ids[ids >= 0]
    if not routed.size:
        return 0
    count_tokens(layer, np.bincount(routed.ravel()))
    return int(routed.size)


def count_tokens(layer: int, counts: np.ndarray) -> None:
    """Add ``counts`` (tokens per expert id of ``layer``) to the Prometheus counters."""
    for expert in np.flatnonzero(counts).tolist():
        child = _TOKEN_COUNTERS.get((layer, expert))
        if child is None:
            child = _TOKEN_COUNTERS[layer, expert] = metrics.EXPERT_TOKENS.labels(str(layer), str(expert))
        child.inc(int(counts[expert]))


async def shut_down(server: grpc.aio.Server, service, health_servicer, drain_timeout_s: float,
                    torch_transport=None) -> None:
    """The end of every expert node: no new messages (gRPC or torch), finish the ones in flight, stop serving,
    and wait for torch pair groups to close (so no process ends under a live group)."""
    if torch_transport is not None:
        torch_transport.drain()
    await finish_in_flight(service, health_servicer, drain_timeout_s)
    await server.stop(grace=1.0)
    if torch_transport is not None:
        await torch_transport.wait_closed(drain_timeout_s)


async def finish_in_flight(service, health_servicer, drain_timeout_s: float) -> None:
    """Health NOT_SERVING, take no new messages, and wait (bounded) for the ones being computed."""
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    service.drain()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + drain_timeout_s
    while service.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.01)


def handlers(service) -> grpc.GenericRpcHandler:
    """The ExpertDispatch methods, with Dispatch taking undecoded bytes.

    The generated stubs would reject a message that does not parse with a generic
    INTERNAL error before our code sees it; decoding ourselves lets a garbled message
    get INVALID_ARGUMENT with a reason, like any other malformed request.
    """
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Dispatch": grpc.stream_stream_rpc_method_handler(
            service.Dispatch, request_deserializer=None,
            response_serializer=dispatch_pb2.DispatchResponse.SerializeToString),
        "Info": grpc.unary_unary_rpc_method_handler(
            service.Info, request_deserializer=dispatch_pb2.InfoRequest.FromString,
            response_serializer=dispatch_pb2.InfoResponse.SerializeToString),
    })


def dispatch_server(service: DispatchService, host: str = "127.0.0.1", port: int = 0, tls: TLSFiles | None = None,
                    also_reflect: tuple[str, ...] = (), *, max_message_bytes: int | None = None
                    ) -> tuple[grpc.aio.Server, int, health.HealthServicer]:
    """The ExpertDispatch server (see :func:`moemesh.wire.server.create_server`); returns (server, port, health).

    ``also_reflect``: full names of services the caller adds before starting it (e.g. TorchTransport).
    ``max_message_bytes``: :func:`message_limit` of the model and step (default: the service's); a larger
    message gets RESOURCE_EXHAUSTED (that stream ends, the node keeps serving).
    """
    return create_server("expert", lambda server: server.add_generic_rpc_handlers((handlers(service),)),
                         (SERVICE_NAME, *also_reflect), host, port, tls=tls,
                         max_message_bytes=max_message_bytes or service.max_message_bytes)
