"""Attention node process: the engine behind the AttentionNode gRPC service, with experts found via etcd.

Start-up: load the attention weights, bind (health NOT_SERVING), register
``status: loading``; when the placement's expert nodes are all ready, connect to
them and turn ``ready``/SERVING. A newer placement (once its expert nodes hold
their shares) installs a new backend between two engine steps, and the record's
``placement_version`` says so: expert nodes drop experts only after every attention
node has moved on. Without etcd, ``--expert-nodes`` gives a static placement instead.
SIGTERM: ``draining`` (the router stops sending), in-flight requests finish, exit.
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import time
from dataclasses import replace
from pathlib import Path

from grpc_health.v1 import health_pb2

from moemesh.model.checkpoint import checkpoint_fingerprint
from moemesh.control.cluster_view import ClusterView
from moemesh.model.config import ModelConfig
from moemesh.control.etcd import Registry
from moemesh.control.records import Capacity, NodeRecord
from moemesh.wire.health_port import start_health_port
from moemesh.kernels.ops import select_ops
from moemesh.logs import get_logger
from moemesh.control.node_ids import advertise_address, default_node_id
from moemesh.control.placement import Placement
from moemesh.control.servability import Servability, judge, live_expert_nodes, min_slots
from moemesh.wire.tls import TLSFiles
from moemesh.model.chat_template import ChatTemplate, ChatTemplateError
from moemesh.model.tokenizer import Tokenizer

from .attach import attach_experts
from .engine import Engine, EngineConfig
from .engine_loop import EngineLoop
from .load_stats import LoadStats
from .loader import load_transformer
from .experts.remote_backend import RemoteExpertBackend
from .service import SERVICE_NAME, AttentionService, attention_server
from .experts.switchable_backend import SwitchableBackend
from .experts.torch_link import links_for

log = get_logger("moemesh.attn_node.serve")
CONNECT_TIMEOUT_S = 5.0  # a placement's expert nodes are ready by their records: they answer fast
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def serve_attention(model_dir: str, host: str, port: int, dtype, engine_config: EngineConfig, *,
                          etcd: str | None = None, cluster: str = "default", static: Placement | None = None,
                          node_id: str | None = None, advertise: str | None = None, kernels: str = "auto",
                          dispatch_timeout_s: float = 30.0, drain_timeout_s: float = 60.0,
                          max_pending: int = 256, tls: TLSFiles | None = None,
                          health_port: int | None = None, transport: str = "grpc", device="cpu",
                          etcd_credentials=None, served_model_name: str | None = None) -> None:
    """``device`` (resolved by the caller, as ``dtype``): the weights, latent cache, sampler, load counts and the
    torch transport's frames live there. ``etcd_credentials``: an EtcdCredentials for a secured etcd, or None.
    ``served_model_name``: the model's name to clients (ModelInfo), default the checkpoint directory's."""
    cfg = ModelConfig.from_dir(model_dir)
    tokenizer, chat_template = Tokenizer.from_dir(model_dir), ChatTemplate.from_dir(model_dir)  # read once, here
    _warn_if_broken(chat_template)
    checkpoint = checkpoint_fingerprint(model_dir)  # expert nodes must serve the same one
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    backend = SwitchableBackend()
    stats = LoadStats(cfg.moe_layers, cfg.n_routed_experts, device=device)
    model = await asyncio.to_thread(load_transformer, model_dir, cfg, dtype, False, select_ops(device, kernels),
                                    device)
    engine = Engine(attach_experts(model, backend, stats), cfg, engine_config, backend=backend)
    # What loading built lives as long as the process: out of every later full collection (as vLLM
    # does). Unfrozen, one gen-2 pass over it took ~190 ms, the slowest hop of a first round.
    gc.collect()
    gc.freeze()
    engine_loop = EngineLoop(engine, max_pending=max_pending).start()
    service = AttentionService(engine_loop, cfg, tokenizer, stats, chat_template=chat_template,
                               model_name=served_model_name or default_model_name(model_dir))
    server, bound, health = attention_server(service, host, port, tls)
    await server.start()
    health_server = await start_health_port(health, host, health_port)  # noqa: F841 (kept alive)

    async def set_health(status) -> None:
        for name in ("", SERVICE_NAME):
            await health.set(name, status)

    await set_health(NOT_SERVING)
    node_id = node_id or default_node_id("attn", bound)
    blocks = engine_loop.engine.blocks
    record = NodeRecord(node_id, "attn", advertise_address(host, bound, advertise), "loading", experts={},
                        tls=tls is not None, capacity=Capacity(kv_cache_tokens=blocks.capacity_tokens,
                                                               max_num_seqs=engine_config.max_num_seqs))

    async def became_ready() -> None:
        await set_health(SERVING)
        print(json.dumps({"event": "ready", "port": bound, "node_id": node_id}), flush=True)

    reg = follower = None
    if static is not None:
        backend.install(await asyncio.to_thread(RemoteExpertBackend, cfg, static, dispatch_timeout_s, 10.0, tls,
                                                links_for(transport, cfg.hidden_size, dispatch_timeout_s,
                                                          device=device),
                                                checkpoint=checkpoint, device=device))
        await became_ready()
    if etcd is not None:
        reg = await Registry.connect(etcd, cluster, credentials=etcd_credentials)
        await reg.register(record if static is None else replace(record, status="ready"))
        following = BackendFollower(reg, cfg, backend, dispatch_timeout_s, became_ready, tls, transport, checkpoint,
                                    device)
        backend.outlook = following.servability  # a step whose experts are gone waits only if a placement can come
        follower = asyncio.create_task(following.run())
    await stop.wait()

    log.info("draining", running=engine_loop.num_running(), waiting=engine_loop.num_waiting())
    await set_health(NOT_SERVING)
    if reg is not None:
        await reg.update(status="draining")
    await server.stop(grace=drain_timeout_s)  # in-flight Generate streams finish; new calls are refused
    if follower is not None:
        follower.cancel()
    engine_loop.stop()
    backend.close()
    if reg is not None:
        await reg.close()
    log.info("stopped")


def _warn_if_broken(chat_template: ChatTemplate | None) -> None:
    """A template that does not parse fails each chat request (400, naming the line); say so once, at start-up."""
    try:
        if chat_template is not None:
            chat_template.check()
    except ChatTemplateError as exc:
        log.warning("chat_template_invalid", error=str(exc))


def default_model_name(model_dir: str | Path) -> str:
    """The checkpoint directory's name (``.../DeepSeek-V3/`` -> ``DeepSeek-V3``), as vLLM names a local model."""
    return Path(model_dir).resolve().name


TICK_S = 1.0  # look again even without etcd events: retry a failed dial, re-dial a node whose link broke
REDIAL_AFTER_S = 3.0  # a broken link is re-dialled only if no re-plan took its node out by then


class BackendFollower:
    """Installs the serving placement's backend; retries failed dials and re-dials links that broke.

    A link breaks when its node died (the leader re-plans within milliseconds) or on a transient fault
    (a missed deadline, a restart at the same address): then nothing in etcd changes, so the follower
    re-dials the same placement itself once the link has been down for REDIAL_AFTER_S.
    """

    def __init__(self, reg, cfg, backend, dispatch_timeout_s, became_ready, tls, transport, checkpoint, device="cpu"):
        self.reg, self.cfg, self.backend = reg, cfg, backend
        self.dispatch_timeout_s, self.became_ready, self.tls = dispatch_timeout_s, became_ready, tls
        self.transport, self.checkpoint, self.device = transport, checkpoint, device
        self.view = ClusterView()
        self.experts: tuple[NodeRecord, ...] = ()  # the expert records after the last batch (the engine thread reads)
        self.serving: Placement | None = None
        self.broken_since: float | None = None
        self.retry_at, self.backoff = 0.0, 0.5

    async def run(self) -> None:
        async for batch in self.reg.watch_cluster(TICK_S):
            for ev in batch:
                self.view.apply(ev)
            self.experts = tuple(self.view.records("expert"))  # one swap: a consistent snapshot for servability
            try:
                await self._reconcile()
            except Exception:  # never stop following: log, and the next tick tries again
                log.exception("placement_follow_failed")

    def servability(self, current) -> Servability | None:
        """Whether ``current``'s placement can serve over the live expert nodes (called on the engine thread).

        Live: registered (not draining or failed) and, for the placement's nodes, with an unbroken link (a
        killed node's record outlives it by its lease; its link breaks at once). None without a placement."""
        if not isinstance(current, RemoteExpertBackend):
            return None
        links = list(current.links)
        alive = {n for n, link in enumerate(links) if link.failure is None}
        broken = {link.address for link in links if link.failure is not None}
        missing = current.placement.missing(self.cfg.moe_layers, self.cfg.n_routed_experts, alive)
        live = [r for r in live_expert_nodes(self.experts) if r.address not in broken]
        return judge(missing, len(live), min_slots(live), self.cfg.n_routed_experts)

    def _broken(self, current) -> bool:
        """True once some link of the current backend has been down for REDIAL_AFTER_S."""
        if current is None or not any(link.failure is not None for link in current.links):
            self.broken_since = None
            return False
        now = time.monotonic()
        self.broken_since = self.broken_since or now
        return now - self.broken_since >= REDIAL_AFTER_S

    async def _reconcile(self) -> None:
        placement = self.view.serving_placement()
        if placement is None:
            return
        current = self.backend.current
        broken = self._broken(current)
        if (placement == self.serving and not broken) or time.monotonic() < self.retry_at:
            return
        if not broken and self.serving is not None and current is not None and _same_replicas(placement, self.serving):
            current.reroute(placement)  # only shares changed: keep the links (and torch groups)
            await self._serve(placement, "placement_shares_updated")
            return
        new = await self._build(placement)
        if new is None:
            return
        await asyncio.to_thread(self.backend.install, new)  # takes effect between two engine steps
        self.broken_since = None
        first = self.serving is None
        await self._serve(placement, "placement_redialled" if placement == self.serving else "placement_installed")
        if first:
            await self.became_ready()

    async def _build(self, placement: Placement):
        """A backend for ``placement``, or None (logged; retried with backoff). Closed if we are cancelled."""
        # --transport torch: each placement version gets new links, hence new pair groups (re-formed here)
        task = asyncio.ensure_future(asyncio.to_thread(
            RemoteExpertBackend, self.cfg, placement, self.dispatch_timeout_s, CONNECT_TIMEOUT_S, self.tls,
            links_for(self.transport, self.cfg.hidden_size, self.dispatch_timeout_s, placement.version, self.device),
            checkpoint=self.checkpoint, device=self.device))
        try:
            new = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: t.cancelled() or t.exception() or t.result().close())
            raise
        except Exception as exc:  # a node went away between its record and our dial, or is not serving yet
            self.retry_at = time.monotonic() + self.backoff
            log.warning("placement_connect_failed", version=placement.version, error=str(exc),
                        retry_in_s=self.backoff)
            self.backoff = min(self.backoff * 2, 5.0)
            return None
        self.backoff = 0.5
        return new

    async def _serve(self, placement: Placement, event: str) -> None:
        self.serving = placement
        await self.reg.update(status="ready", placement_version=placement.version)
        log.info(event, version=placement.version, nodes=list(placement.nodes))


def _same_replicas(a: Placement, b: Placement) -> bool:
    return a.nodes == b.nodes and a.replicas == b.replicas
