"""The router's gRPC front door: ``moemesh.v1.Inference`` over the cluster's attention nodes.

Generate runs the router's request path (:mod:`.generation`: admission, validation, node selection,
failover and resume), the same one the OpenAI HTTP door (:mod:`.openai_api`) runs; this servicer only
turns its domain errors into status codes (:mod:`moemesh.wire.status`; an UnservableError with
NO_RETRY) and its hooks into metadata. Tokenize and ModelInfo go to a ready attention node (the router
has no model files); ClusterStatus answers from the live view.

Every router replica serves clients; the :class:`~.cluster.ControlPlane` decides which one leads.
The request id (the client's, or a fresh one) travels to the node in the request and in gRPC
metadata ``x-request-id``; the node that served it comes back in initial metadata ``x-moemesh-node``,
and the nodes that streamed it (in order, more than one after a resume) in trailing metadata
``x-moemesh-nodes``, with ``x-moemesh-resumes``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from grpc_health.v1 import health_pb2

from moemesh.wire.health_port import start_health_port
from moemesh import metrics
from moemesh.control.cluster_view import ClusterView
from moemesh.control.etcd import Registry, RegistryError, check_cluster_name
from moemesh.control.records import PlacementStats
from moemesh.control.servability import Servability, live_expert_nodes
from moemesh.errors import MoemeshError
from moemesh.logs import get_logger
from moemesh.wire.server import create_server
from moemesh.wire.status import NO_RETRY, abort
from moemesh.v1 import inference_pb2, inference_pb2_grpc

from .admission import (
    DEFAULT_MAX_QUEUED, DEFAULT_MAX_QUEUED_PER_CLIENT, DEFAULT_MAX_RUNNING_PER_CLIENT, Admission, grpc_caller,
)
from .auth import INFERENCE_SERVICE, TLSFiles, router_authenticator
from .cluster import ControlPlane, PlacementPolicy
from .generation import (  # noqa: F401 (MAX_RESUMES, NoNodeError, RETRY_BEFORE_FIRST_TOKEN: re-exported)
    MAX_RESUMES, RETRY_BEFORE_FIRST_TOKEN, ROLE, CallHooks, GenerationPath, GenerationRecord, NodeStatusError,
    NoNodeError,
)
from .hop_status import fill_hops, straggler_ids
from .pool import AttentionPool
from .zone_status import placement_zone_warnings

log = get_logger("moemesh.router")

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class InferenceService(inference_pb2_grpc.InferenceServicer):
    """Thin servicer over :class:`~.generation.GenerationPath`: its domain errors become status codes."""

    def __init__(self, view: ClusterView, pool: AttentionPool, *, max_inflight: int = 512,
                 call_timeout_s: float = 10.0, generate_timeout_s: float = 3600.0, max_resumes: int = MAX_RESUMES,
                 admission: Admission | None = None, tokens_checked: bool = False,
                 servability: Callable[[], Servability | None] = lambda: None):
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.view, self.pool = view, pool
        self.max_inflight = max_inflight
        # Per-client limits (see .admission); the router's running limit is max_inflight.
        self.admission = admission or Admission(max_running=max_inflight,
                                                max_running_per_client=min(max_inflight, DEFAULT_MAX_RUNNING_PER_CLIENT))
        self.path = GenerationPath(view, pool, self.admission, call_timeout_s=call_timeout_s,
                                   generate_timeout_s=generate_timeout_s, max_resumes=max_resumes,
                                   tokens_checked=tokens_checked, servability=servability)
        metrics.QUEUE_DEPTH.labels(ROLE).set_function(lambda: self.admission.queued)

    @property
    def inflight(self) -> int:
        """Generate streams running or queued at this router."""
        return self.path.inflight

    async def model_info(self) -> inference_pb2.ModelInfoResponse:
        return await self.path.model_info()

    async def validate(self, request: inference_pb2.GenerateRequest) -> None:
        await self.path.validate(request)

    # ---- Generate ---------------------------------------------------------------
    async def Generate(self, request, context):
        async def first_node(node_id: str) -> None:  # the node serving the stream, in initial metadata
            await context.send_initial_metadata((("x-moemesh-node", node_id),))

        def finished(record: GenerationRecord) -> None:
            # Which nodes served the stream (in order) and how often it moved, for clients that care.
            context.set_trailing_metadata((("x-moemesh-nodes", ",".join(record.nodes)),
                                           ("x-moemesh-resumes", str(record.resumes))))

        hooks = CallHooks(time_remaining=context.time_remaining, cancelled=context.cancelled,
                          first_node=first_node, finished=finished)
        responses = self.path.generate(request, grpc_caller(context), hooks)
        try:
            async for response in responses:
                yield response
        except MoemeshError as exc:
            await _abort(context, exc)
        finally:
            await responses.aclose()

    # ---- the other Inference methods ----------------------------------------------
    async def Tokenize(self, request, context):
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        try:
            ids = await self.path.tokenize(request.text, add_special_tokens=add)
            return inference_pb2.TokenizeResponse(token_ids=ids)
        except MoemeshError as exc:
            await _abort(context, exc)

    async def ModelInfo(self, request, context):
        try:
            return await self.path.model_info()
        except MoemeshError as exc:
            await _abort(context, exc)

    async def ClusterStatus(self, request, context):
        try:
            self.path.check_synced()
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
        applied = stats.applied_fractions() or planned  # after stragglers were given less (straggler_shares.py)
        nodes = []
        for r in records:
            status = inference_pb2.NodeStatus(id=r.id, role=r.role, address=r.address, status=r.status,
                                              placement_version=r.placement_version or 0,
                                              planned_load=planned.get(r.id, 0.0),
                                              applied_load=applied.get(r.id, 0.0), zone=r.zone or "")
            for layer, ids in r.hosted().items():
                status.experts.add(layer=layer, experts=ids)
            load = loads.get(r.id)
            if load is not None and load.known:
                status.running, status.waiting, status.cache_free = load.running, load.waiting, load.cache_free
                status.prompt_tokens, status.prefix_hit_tokens = load.prompt_tokens, load.prefix_hit_tokens
                status.cached_blocks, status.evicted_blocks = load.cached_blocks, load.evicted_blocks
                status.micro_batches = load.micro_batches
            info = infos.get(r.id)
            if info is not None:
                status.tokens_computed = info.tokens_computed
            nodes.append(status)
        await fill_hops(self.pool, attn, nodes)  # per expert node: the attention nodes' hop summaries
        balance = [inference_pb2.LayerBalance(layer=layer, balancedness=float(b))
                   for layer, b in sorted(stats.balancedness.items())]
        verdict = self.path.servability()
        response = inference_pb2.ClusterStatusResponse(
            nodes=nodes, placement_version=self.view.placement_version, leader=self.view.leader or "",
            balance=balance, moved=stats.moved, placement_reason=stats.reason, window_tokens=stats.window_tokens,
            zone_warnings=placement_zone_warnings(placement, live_expert_nodes(records)))
        if verdict is not None:
            response.mesh_state, response.mesh_problem = verdict.state, verdict.message
            for layer, ids in verdict.missing.items():
                response.missing_experts.add(layer=layer, experts=ids)
        return response


async def _abort(context, exc: MoemeshError):
    """End the call with ``exc``'s status: a node's own status as it gave it, a domain error by the table."""
    if isinstance(exc, NodeStatusError):
        await context.abort(exc.code, exc.details, trailing_metadata=NO_RETRY if exc.no_retry else ())
    await abort(context, exc)


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
                 etcd_credentials=None, http_port: int | None = None, http_host: str | None = None,
                 door_options=None):
        self.etcd, self.host, self.requested_port = etcd, host, port
        # The OpenAI HTTP door (router/openai_api): on http_host (default: host) when http_port is given.
        self.requested_http_port, self.http_host, self.door_options = http_port, http_host or host, door_options
        self.http = None
        self.http_port: int | None = None
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

    async def _stragglers(self, experts) -> set[str]:  # for the leader's plans: router/straggler_shares.py
        return await straggler_ids(self.pool, self.view.ready_attention_nodes(), experts)

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
        if self.requested_http_port is not None:
            await self._start_http()
        log.info("router_listening", host=self.host, port=self.port, router_id=self.router_id,
                 tls=self._tls is not None, mtls=bool(self._tls and self._tls.ca), auth=bool(self._auth_token))
        self._connect_task = asyncio.get_running_loop().create_task(self._connect(), name="router-connect")
        return self.port

    async def _start_http(self) -> None:
        from .openai_api.app import create_app  # the HTTP stack loads only for routers that serve it
        from .openai_api.auth import HttpAuth
        from .openai_api.door import Door
        from .openai_api.serve import HttpServer

        door = Door(self.service.path, HttpAuth(router_authenticator(self._tls, self._auth_token)), self.door_options)
        self.http = HttpServer(create_app(door), self.http_host, self.requested_http_port, tls=self._tls)
        self.http_port = await self.http.start()

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
                                            fetch_loads=self.pool.expert_loads, tls=self._tls,
                                            fetch_stragglers=self._stragglers)
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
        stopping = [self.server.stop(grace_s)] if self.server is not None else []
        if self.http is not None:
            stopping.append(self.http.stop(grace_s))
        await asyncio.gather(*stopping)
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
