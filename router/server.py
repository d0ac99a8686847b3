"""The router's gRPC front door: ``moemesh.v1.Inference`` over the cluster's attention nodes.

Generate is admitted by its client first (:mod:`.admission`: per-client running and queued limits,
RESOURCE_EXHAUSTED past them, the slot freed however the call ends), then validates the request, picks a ready attention node (:mod:`.selection` over the loads in
:mod:`.pool`), and proxies that node's token stream. A node that dies or goes away (UNAVAILABLE;
CANCELLED/ABORTED while draining or gone; a stream that ends without a finish_reason), or one that
is full before its first token (RESOURCE_EXHAUSTED), is left for the next ready node. When tokens
had already reached the client, the next node resumes the generation from the prompt plus exactly
those tokens (:mod:`.resume`), and the client's stream goes on with no token repeated or missing, at
most ``max_resumes`` times, within the client's deadline, never after the client left. Other errors
end the call with the node's status. Tokenize and ModelInfo go to a ready attention node (the router
has no model files); ClusterStatus answers from the live view.

Every router replica serves clients; the :class:`~.cluster.ControlPlane` decides which one leads.
The request id (the client's, or a fresh one) travels to the node in the request and in gRPC
metadata ``x-request-id``; the node that served it comes back in initial metadata ``x-moemesh-node``,
and the nodes that streamed it (in order, more than one after a resume) in trailing metadata
``x-moemesh-nodes``, with ``x-moemesh-resumes``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import grpc
import structlog
from grpc_health.v1 import health_pb2

from moemesh.wire.health_port import start_health_port
from moemesh import metrics
from moemesh.control.cluster_view import ClusterView
from moemesh.control.etcd import Registry, RegistryError, check_cluster_name
from moemesh.control.records import NodeRecord, PlacementStats
from moemesh.control.servability import Servability
from moemesh.errors import (
    DeadlineExceededError, InvalidRequestError, MoemeshError, ResourceExhaustedError, UnavailableError,
    UnservableError,
)
from moemesh.logs import get_logger
from moemesh.wire.requests import check_request_id, sampling_from_proto
from moemesh.wire.server import create_server
from moemesh.wire.status import abort, no_retry, trailing_metadata
from moemesh.v1 import inference_pb2, inference_pb2_grpc

from .admission import (
    DEFAULT_MAX_QUEUED, DEFAULT_MAX_QUEUED_PER_CLIENT, DEFAULT_MAX_RUNNING_PER_CLIENT, REJECTED, Admission,
    AdmissionGate, client_key,
)
from .auth import INFERENCE_SERVICE, TLSFiles, router_authenticator
from .cluster import ControlPlane, PlacementPolicy
from .pool import AttentionPool
from .resume import StreamProgress, failure_reason
from .selection import NodeLoad

log = get_logger("moemesh.router")
ROLE = "router"  # the metrics label

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
MAX_TEXT_CHARS = 1 << 20
RETRY_BEFORE_FIRST_TOKEN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)  # unary calls
MAX_RESUMES = 3  # times one generation may move to another node after tokens reached the client


class NoNodeError(UnavailableError):
    """No attention node can take the call now: retry later."""


class InferenceService(inference_pb2_grpc.InferenceServicer):
    """Thin servicer: validate, pick a node, proxy; domain errors become status codes (moemesh.wire.status)."""

    def __init__(self, view: ClusterView, pool: AttentionPool, *, max_inflight: int = 512,
                 call_timeout_s: float = 10.0, generate_timeout_s: float = 3600.0, max_resumes: int = MAX_RESUMES,
                 admission: Admission | None = None, tokens_checked: bool = False,
                 servability: Callable[[], Servability | None] = lambda: None):
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if max_resumes < 0:
            raise ValueError(f"max_resumes must be >= 0, got {max_resumes}")
        self.max_resumes = max_resumes
        self.view, self.pool = view, pool
        self.servability = servability  # the control plane's verdict on the live placement
        self.max_inflight = max_inflight
        self.call_timeout_s = call_timeout_s
        self.generate_timeout_s = generate_timeout_s
        # Per-client limits (see .admission); the router's running limit is max_inflight.
        self.admission = admission or Admission(max_running=max_inflight,
                                                max_running_per_client=min(max_inflight, DEFAULT_MAX_RUNNING_PER_CLIENT))
        self.gate = AdmissionGate(self.admission)
        self.tokens_checked = tokens_checked  # the bearer token names the client (the interceptor checked it)
        metrics.QUEUE_DEPTH.labels(ROLE).set_function(lambda: self.admission.queued)
        self._model_info: inference_pb2.ModelInfoResponse | None = None
        self._model_info_lock = asyncio.Lock()

    # ---- helpers ----------------------------------------------------------------
    def _check_synced(self) -> None:
        if not self.view.synced:
            raise NoNodeError("the router is not connected to etcd yet, so it knows no attention node: retry soon")

    async def _ranked(self, exclude: set[str] = frozenset(), request=None):
        self._check_synced()
        ranked = await self.pool.ranked(exclude, request)
        if not ranked and not exclude:
            raise NoNodeError("no attention node is ready")
        return ranked

    async def _unary(self, method: str, request, what: str):
        """Call ``method`` on the best ready node; on UNAVAILABLE/RESOURCE_EXHAUSTED try the next."""
        tried: set[str] = set()
        errors: list[str] = []
        while True:
            ranked = await self._ranked(tried)
            if not ranked:
                raise NoNodeError(f"no attention node answered {what}: {'; '.join(errors)}")
            record, _ = ranked[0]
            tried.add(record.id)
            try:
                return await getattr(self.pool.stub(record), method)(request, timeout=self.call_timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRY_BEFORE_FIRST_TOKEN:
                    raise
                self.pool.forget_load(record.id)
                errors.append(f"{record.id}: {exc.code().name} {exc.details()}")

    async def model_info(self) -> inference_pb2.ModelInfoResponse:
        """The model's shape, asked of an attention node once and kept (forgotten when none is left)."""
        if not self.view.records("attn"):
            self._model_info = None
        if self._model_info is None:
            async with self._model_info_lock:
                if self._model_info is None:
                    self._model_info = await self._unary("ModelInfo", inference_pb2.ModelInfoRequest(), "ModelInfo")
        return self._model_info

    def _unservable(self, node_error: grpc.aio.AioRpcError | None = None) -> UnservableError | None:
        """Why no attention node can serve a generation now, or None.

        The live placement lacks experts that no re-plan can place (``moemesh.control.servability``: the
        router's verdict), or the attention node that just failed said so (its status carries NO_RETRY).
        Either way every node would fail alike: the call ends at once, with the missing experts named,
        instead of each attempt waiting ``expert_wait_s`` for a placement that cannot come. While a re-plan
        can place them (``degraded``), calls go on to the attention nodes, whose steps wait for it."""
        if node_error is not None and no_retry(trailing_metadata(node_error)):
            return UnservableError(node_error.details() or "the mesh cannot serve")
        verdict = self.servability()
        return None if verdict is None else verdict.error()

    # ---- Generate ---------------------------------------------------------------
    async def validate(self, request: inference_pb2.GenerateRequest) -> None:
        """Every field the router can check without the model's files (InvalidRequestError names it)."""
        check_request_id(request.request_id)
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise InvalidRequestError("prompt is missing: set prompt text or token_ids")
        if request.resume_token_ids:
            raise InvalidRequestError("resume_token_ids is internal to the cluster (router -> attention node); "
                                      "clients must leave it empty")
        info = await self.model_info()
        sampling = sampling_from_proto(request.sampling, info.vocab_size)
        context = info.max_position_embeddings
        if kind == "text":
            if not request.text:
                raise InvalidRequestError("prompt text is empty: give some text or token_ids")
            if len(request.text) > MAX_TEXT_CHARS:
                raise InvalidRequestError(f"prompt text has {len(request.text)} characters; at most {MAX_TEXT_CHARS}")
            if not info.has_tokenizer:
                raise InvalidRequestError("this model has no tokenizer: send prompt token_ids instead of text")
            n_prompt = 1  # the attention node counts the tokens; at least one
        else:
            ids = request.token_ids.ids
            if not ids:
                raise InvalidRequestError("prompt token_ids is empty: give at least one token")
            bad = [t for t in ids if t >= info.vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt token_ids {bad[:5]} are outside the vocabulary "
                                          f"(0..{info.vocab_size - 1})")
            n_prompt = len(ids)
        if context and n_prompt + sampling.max_tokens > context:
            raise InvalidRequestError(
                f"prompt ({n_prompt} tokens) + sampling.max_tokens ({sampling.max_tokens}) exceeds the model's "
                f"context of {context} tokens: shorten the prompt or lower max_tokens")

    @property
    def inflight(self) -> int:
        """Generate streams running or queued at this router."""
        return self.admission.running + self.admission.queued

    async def _admit(self, context):
        """This call's admission ticket, once it may run; RESOURCE_EXHAUSTED past the caller's limits."""
        ticket = self.gate.admit(client_key(context, tokens_checked=self.tokens_checked))
        if ticket.state == REJECTED:
            metrics.ADMISSION_REJECTIONS.labels(ROLE, ticket.reason).inc()
            log.warning("generate_refused", reason=ticket.reason, running=self.admission.running,
                        queued=self.admission.queued)
            await abort(context, ResourceExhaustedError(ticket.message))
        try:
            await self.gate.wait(ticket, context.time_remaining())
        except asyncio.TimeoutError:
            self.gate.release(ticket)
            await abort(context, DeadlineExceededError(
                "the client's deadline passed while the request waited at the router for a running slot"))
        except BaseException:  # cancelled (the client left) while queued
            self.gate.release(ticket)
            raise
        return ticket

    async def Generate(self, request, context):
        rid = request.request_id or uuid.uuid4().hex
        with structlog.contextvars.bound_contextvars(request_id=rid):
            started = last = time.monotonic()
            ticket = await self._admit(context)
            outcome = "cancelled"  # unless the stream ends otherwise
            first = True
            try:
                async for response in self._generate(request, rid, context):
                    now = time.monotonic()
                    (metrics.TIME_TO_FIRST_TOKEN if first else metrics.TIME_PER_OUTPUT_TOKEN).labels(ROLE).observe(
                        now - (started if first else last))
                    metrics.GENERATED_TOKENS.labels(ROLE).inc(len(response.token_ids))
                    first, last = False, now
                    if response.finish_reason:
                        outcome = response.finish_reason
                    yield response
            except BaseException as exc:
                outcome = "cancelled" if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) else "error"
                raise
            finally:
                self.gate.release(ticket)  # finished, failed, cancelled or the client left: the slot frees
                metrics.REQUESTS.labels(ROLE, outcome).inc()

    async def _generate(self, request, rid: str, context):
        started = time.monotonic()
        try:
            await self.validate(request)
        except (MoemeshError, grpc.aio.AioRpcError) as exc:
            log.info("generate_rejected", error=str(exc) if isinstance(exc, MoemeshError) else exc.details())
            await abort(context, exc)
        unservable = self._unservable()
        if unservable is not None:
            log.warning("generate_unservable", error=str(unservable))
            await abort(context, unservable)
        forward = inference_pb2.GenerateRequest()
        forward.CopyFrom(request)
        forward.request_id = rid
        progress = StreamProgress(forward)
        tried: set[str] = set()
        errors: list[str] = []
        codes: list[grpc.StatusCode | None] = []
        failed: tuple[str, str] | None = None  # (node, reason) of the last attempt that broke
        while True:
            record, load = await self._pick_node(context, progress, tried, errors, codes)
            node_id = record.id
            tried.add(node_id)
            if progress.started:
                self._note_resume(progress, node_id, *failed)
            call = self.pool.stub(record).Generate(progress.next_request(), timeout=self._attempt_timeout(context),
                                                   metadata=(("x-request-id", rid),))
            self.pool.streams[node_id] = self.pool.streams.get(node_id, 0) + 1
            from_node, code, details = 0, None, "the stream ended without a finish_reason"
            node_error: grpc.aio.AioRpcError | None = None
            try:
                async for response in call:
                    if not progress.nodes:  # the client's first response: name the node serving it
                        await context.send_initial_metadata((("x-moemesh-node", node_id),))
                        log.info("generate_first_token", node=node_id, attempts=len(tried), node_queue=load.queue,
                                 ttft_ms=round((time.monotonic() - started) * 1000, 1))
                    yield response
                    progress.record(node_id, response)  # only now does the client have it
                    from_node += 1
                    if response.finish_reason:
                        self._finish(context, progress, response, started)
                        return
            except grpc.aio.AioRpcError as exc:
                code, details, node_error = exc.code(), exc.details() or exc.code().name, exc
            finally:
                self.pool.streams[node_id] -= 1
                call.cancel()
            unservable = self._unservable(node_error)
            if unservable is not None:  # another node would fail alike: fail once, saying why
                log.warning("generate_unservable", node=node_id, error=str(unservable), tokens_sent=len(progress.sent))
                await abort(context, unservable)
            reason = failure_reason(code, self._node_status(node_id), from_node)
            await self._check_can_move(context, progress, node_id, code, details, reason)
            self.pool.forget_load(node_id)
            errors.append(f"{node_id}: {code.name if code else 'OK'} {details}")
            codes.append(code)
            failed = (node_id, reason)
            log.warning("generate_failover", node=node_id, code=code.name if code else None, error=details,
                        reason=reason, tokens_sent=len(progress.sent))

    async def _pick_node(self, context, progress: StreamProgress, tried: set[str], errors: list[str],
                         codes: list) -> tuple[NodeRecord, NodeLoad]:
        """The best ready node not tried yet; when none is left, abort the call saying what each answered."""
        try:
            ranked = await self._ranked(tried, progress.request)  # the prompt's prefix holder first (router/pool.py)
        except NoNodeError as exc:
            await abort(context, exc)
        if ranked:
            return ranked[0]
        log.warning("generate_no_node", tried=sorted(tried), errors=errors, tokens_sent=len(progress.sent))
        busy = set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}  # all full: back off, do not reconnect
        after = f" after {len(progress.sent)} token(s) were streamed" if progress.started else ""
        await abort(context, (ResourceExhaustedError if busy else UnavailableError)(
            f"no attention node could take the request{after}: {'; '.join(errors)}"))

    def _attempt_timeout(self, context) -> float:
        remaining = context.time_remaining()  # the client's deadline bounds every attempt
        return self.generate_timeout_s if remaining is None else min(remaining, self.generate_timeout_s)

    def _node_status(self, node_id: str) -> str | None:
        """The node's record status now; None when its record is gone (lease expired, node left)."""
        record = self.view.node("attn", node_id)
        return None if record is None else record.status

    async def _check_can_move(self, context, progress: StreamProgress, node_id: str, code, details: str,
                              reason: str | None) -> None:
        """Abort the client's call unless the generation may go on on another node."""
        tokens = len(progress.sent)
        if reason is None:  # the request's own failure (bad argument, deadline, ...): another node would agree
            log.warning("generate_failed", node=node_id, code=code.name, error=details, tokens=tokens)
            await context.abort(code, details)
        if context.cancelled():  # the client went away: nobody to resume for
            log.info("generate_cancelled", node=node_id, tokens=tokens)
            raise asyncio.CancelledError()
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await abort(context, DeadlineExceededError(
                f"attention node {node_id} failed ({details}) after {tokens} token(s) and the client's deadline "
                "has passed"))
        if progress.started and (progress.resumes >= self.max_resumes or not progress.can_resume()):
            log.warning("generate_failed", node=node_id, code=code.name if code else None, error=details,
                        tokens=tokens, resumes=progress.resumes)
            await abort(context, UnavailableError(
                f"attention node {node_id} failed after streaming {tokens} token(s) and the generation has "
                f"already moved {progress.resumes} time(s): {details}"))

    def _note_resume(self, progress: StreamProgress, node_id: str, failed_node: str, reason: str) -> None:
        progress.resumes += 1
        metrics.GENERATE_RESUMES.labels(ROLE, reason).inc()
        log.info("generate_resumed", node=node_id, failed_node=failed_node, reason=reason,
                 tokens_carried=len(progress.sent), resumes=progress.resumes)

    def _finish(self, context, progress: StreamProgress, last, started: float) -> None:
        # Which nodes served the stream (in order) and how often it moved, for clients that care.
        context.set_trailing_metadata((("x-moemesh-nodes", ",".join(progress.nodes)),
                                       ("x-moemesh-resumes", str(progress.resumes))))
        log.info("generate_done", node=progress.nodes[-1], finish_reason=last.finish_reason,
                 completion_tokens=last.usage.completion_tokens, resumes=progress.resumes,
                 seconds=round(time.monotonic() - started, 3))

    # ---- the other Inference methods ----------------------------------------------
    async def Tokenize(self, request, context):
        if len(request.text) > MAX_TEXT_CHARS:
            await abort(context, InvalidRequestError(
                f"text has {len(request.text)} characters; at most {MAX_TEXT_CHARS}"))
        try:
            return await self._unary("Tokenize", request, "Tokenize")
        except (MoemeshError, grpc.aio.AioRpcError) as exc:
            await abort(context, exc)

    async def ModelInfo(self, request, context):
        try:
            return await self.model_info()
        except (MoemeshError, grpc.aio.AioRpcError) as exc:
            await abort(context, exc)

    async def ClusterStatus(self, request, context):
        try:
            self._check_synced()
        except NoNodeError as exc:
            await abort(context, exc)
        records = self.view.records()
        attn = [r for r in records if r.role == "attn" and r.address]
        experts = [r for r in records if r.role == "expert" and r.address]
        loads, infos = await asyncio.gather(asyncio.gather(*(self.pool.load(r) for r in attn)),
                                            asyncio.gather(*(self.pool.expert_info(r) for r in experts)))
        loads = dict(zip([r.id for r in attn], loads))
        infos = dict(zip([r.id for r in experts], infos))
        placement = self.view.placement
        stats = (placement.stats if placement is not None else None) or PlacementStats()
        planned = stats.planned_fractions()
        nodes = []
        for r in records:
            status = inference_pb2.NodeStatus(id=r.id, role=r.role, address=r.address, status=r.status,
                                              placement_version=r.placement_version or 0,
                                              planned_load=planned.get(r.id, 0.0))
            for layer, ids in r.hosted().items():
                status.experts.add(layer=layer, experts=ids)
            load = loads.get(r.id)
            if load is not None and load.known:
                status.running, status.waiting, status.cache_free = load.running, load.waiting, load.cache_free
                status.prompt_tokens, status.prefix_hit_tokens = load.prompt_tokens, load.prefix_hit_tokens
                status.cached_blocks, status.evicted_blocks = load.cached_blocks, load.evicted_blocks
            info = infos.get(r.id)
            if info is not None:
                status.tokens_computed = info.tokens_computed
            nodes.append(status)
        balance = [inference_pb2.LayerBalance(layer=layer, balancedness=float(b))
                   for layer, b in sorted(stats.balancedness.items())]
        verdict = self.servability()
        response = inference_pb2.ClusterStatusResponse(
            nodes=nodes, placement_version=self.view.placement_version, leader=self.view.leader or "",
            balance=balance, moved=stats.moved, placement_reason=stats.reason, window_tokens=stats.window_tokens)
        if verdict is not None:
            response.mesh_state, response.mesh_problem = verdict.state, verdict.message
            for layer, ids in verdict.missing.items():
                response.missing_experts.add(layer=layer, experts=ids)
        return response


def inference_server(service: InferenceService, host: str = "127.0.0.1", port: int = 0, *,
                     tls: TLSFiles | None = None, auth_token: str | tuple[str, ...] | None = None):
    """The Inference server (see :func:`moemesh.wire.server.create_server`); returns ``(server, port, health)``.

    With ``auth_token`` (the client role's token, or one per client) or mTLS (``tls.ca``), every call but
    health needs credentials (:func:`router.auth.router_authenticator`); health stays open for probes.
    """
    return create_server("router", lambda server: inference_pb2_grpc.add_InferenceServicer_to_server(service, server),
                         (INFERENCE_SERVICE,), host, port, tls=tls, auth=router_authenticator(tls, auth_token))


class Router:
    """One router replica: the gRPC server, its etcd session, view, pool and control plane.

    ``await start()`` binds and serves at once (health NOT_SERVING, calls UNAVAILABLE) and connects
    to etcd in the background, retrying; ``await connected()`` waits until health is SERVING.
    """

    def __init__(self, etcd: str, cluster: str = "default", host: str = "127.0.0.1", port: int = 0, *,
                 router_id: str | None = None, auth_token: str | tuple[str, ...] | None = None,
                 tls: TLSFiles | None = None, health_port: int | None = None,
                 max_inflight: int = 512, max_queued: int = DEFAULT_MAX_QUEUED,
                 max_running_per_client: int = DEFAULT_MAX_RUNNING_PER_CLIENT,
                 max_queued_per_client: int = DEFAULT_MAX_QUEUED_PER_CLIENT, ttl_s: float = 5.0, etcd_timeout_s: float = 3.0,
                 policy: PlacementPolicy | None = None,
                 load_timeout_s: float = 0.5, load_max_age_s: float = 0.2,
                 call_timeout_s: float = 10.0, generate_timeout_s: float = 3600.0, max_resumes: int = MAX_RESUMES,
                 etcd_credentials=None):
        self.etcd, self.host, self.requested_port = etcd, host, port
        self.etcd_credentials = etcd_credentials  # EtcdCredentials for a secured etcd, or None
        self.cluster = check_cluster_name(cluster)
        self.router_id = router_id or f"router-{uuid.uuid4().hex[:8]}"
        if not self.router_id.isprintable() or len(self.router_id) > 128:
            raise ValueError(f"router id must be printable and at most 128 characters, got {self.router_id!r}")
        self.ttl_s, self.etcd_timeout_s = ttl_s, etcd_timeout_s
        self.policy = policy or PlacementPolicy()
        self.view = ClusterView()
        self.pool = AttentionPool(self.view, load_timeout_s, load_max_age_s, tls=tls)
        admission = Admission(max_inflight, max_queued, max_running_per_client, max_queued_per_client)
        self.service = InferenceService(self.view, self.pool, max_inflight=max_inflight,
                                        call_timeout_s=call_timeout_s, generate_timeout_s=generate_timeout_s,
                                        max_resumes=max_resumes, admission=admission,
                                        tokens_checked=bool(auth_token), servability=self._servability)
        self._tls, self._auth_token = tls, auth_token
        self.health_port = health_port
        self.server = self.health = None
        self.port: int | None = None
        self.registry: Registry | None = None
        self.control: ControlPlane | None = None
        self._connected = asyncio.Event()
        self._connect_task: asyncio.Task | None = None

    def _servability(self) -> Servability | None:
        return None if self.control is None else self.control.servability()

    @property
    def is_leader(self) -> bool:
        return self.control is not None and self.control.is_leader

    async def start(self) -> int:
        self.server, self.port, self.health = inference_server(
            self.service, self.host, self.requested_port, tls=self._tls, auth_token=self._auth_token)
        await self.server.start()
        self.health_server = await start_health_port(self.health, self.host, self.health_port)
        for name in ("", INFERENCE_SERVICE):
            await self.health.set(name, NOT_SERVING)
        log.info("router_listening", host=self.host, port=self.port, router_id=self.router_id,
                 tls=self._tls is not None, mtls=bool(self._tls and self._tls.ca), auth=bool(self._auth_token))
        self._connect_task = asyncio.get_running_loop().create_task(self._connect(), name="router-connect")
        return self.port

    async def connected(self, timeout_s: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout_s)

    async def _connect(self) -> None:
        backoff = 0.1
        while True:
            try:
                self.registry = await Registry.connect(self.etcd, self.cluster, ttl_s=self.ttl_s,
                                                       timeout_s=self.etcd_timeout_s,
                                                       credentials=self.etcd_credentials)
                self.control = ControlPlane(self.registry, self.router_id, self.view, policy=self.policy,
                                            fetch_loads=self.pool.expert_loads, tls=self._tls)
                await self.control.prime()
                break
            except RegistryError as exc:
                log.warning("router_etcd_retrying", etcd=self.etcd, error=str(exc), retry_in_s=backoff)
                if self.registry is not None:
                    await self.registry.close()
                    self.registry = self.control = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        self.control.start()
        for name in ("", INFERENCE_SERVICE):
            await self.health.set(name, SERVING)
        self._connected.set()
        log.info("router_serving", etcd=self.etcd, cluster=self.cluster, port=self.port,
                 attention_nodes=len(self.view.records("attn")), expert_nodes=len(self.view.records("expert")))

    async def stop(self, grace_s: float = 5.0) -> None:
        """NOT_SERVING, let in-flight streams finish (up to ``grace_s``), then leave etcd (leadership goes at once)."""
        if self.health is not None:
            for name in ("", INFERENCE_SERVICE):
                await self.health.set(name, NOT_SERVING)
        if self.server is not None:
            await self.server.stop(grace_s)
        if self._connect_task is not None:
            self._connect_task.cancel()
            try:
                await self._connect_task
            except BaseException:
                pass
        if self.control is not None:
            await self.control.stop()
        if self.registry is not None:
            await self.registry.close()
        await self.pool.close()
        log.info("router_stopped", router_id=self.router_id)
