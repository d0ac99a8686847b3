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
import json
import signal

from grpc_health.v1 import health_pb2

from moemesh.checkpoint import checkpoint_fingerprint
from moemesh.cluster_view import ClusterView
from moemesh.config import ModelConfig
from moemesh.etcd import Keys, Registry
from moemesh.health_port import start_health_port
from moemesh.kernels.ops import select_ops
from moemesh.logs import get_logger
from moemesh.node_ids import advertise_address, default_node_id
from moemesh.placement import Placement
from moemesh.tls import TLSFiles
from moemesh.tokenizer import Tokenizer

from .engine import Engine, EngineConfig
from .engine_loop import EngineLoop
from .load_stats import LoadStats
from .loader import load_transformer
from .remote_backend import RemoteExpertBackend
from .service import SERVICE_NAME, AttentionService, create_server
from .switchable_backend import SwitchableBackend
from .torch_link import links_for

log = get_logger("moemesh.attn_node.control")
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def serve_attention(model_dir: str, host: str, port: int, dtype, engine_config: EngineConfig, *,
                          etcd: str | None = None, cluster: str = "default", static: Placement | None = None,
                          node_id: str | None = None, advertise: str | None = None, kernels: str = "auto",
                          dispatch_timeout_s: float = 30.0, drain_timeout_s: float = 60.0,
                          max_pending: int = 256, tls: TLSFiles | None = None,
                          health_port: int | None = None, transport: str = "grpc") -> None:
    cfg = ModelConfig.from_dir(model_dir)
    checkpoint = checkpoint_fingerprint(model_dir)  # expert nodes must serve the same one
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    backend = SwitchableBackend()
    stats = LoadStats(cfg.moe_layers, cfg.n_routed_experts)
    model = await asyncio.to_thread(load_transformer, model_dir, cfg, backend, dtype, False,
                                    select_ops("cpu", kernels), stats)
    engine_loop = EngineLoop(Engine(model, cfg, engine_config), max_pending=max_pending).start()
    service = AttentionService(engine_loop, cfg, Tokenizer.from_dir(model_dir), stats)
    server, bound, health = create_server(service, host, port, tls)
    await server.start()
    health_server = await start_health_port(health, host, health_port)  # noqa: F841 (kept alive)

    async def set_health(status) -> None:
        for name in ("", SERVICE_NAME):
            await health.set(name, status)

    await set_health(NOT_SERVING)
    node_id = node_id or default_node_id("attn", bound)
    blocks = engine_loop.engine.blocks
    record = {"address": advertise_address(host, bound, advertise), "status": "loading", "experts": {},
              "tls": tls is not None,
              "capacity": {"kv_cache_tokens": blocks.capacity_tokens, "max_num_seqs": engine_config.max_num_seqs}}

    async def became_ready() -> None:
        await set_health(SERVING)
        print(json.dumps({"event": "ready", "port": bound, "node_id": node_id}), flush=True)

    reg = follower = None
    if static is not None:
        backend.install(await asyncio.to_thread(RemoteExpertBackend, cfg, static, dispatch_timeout_s, 10.0, tls,
                                                links_for(transport, cfg.hidden_size, dispatch_timeout_s),
                                                checkpoint=checkpoint))
        await became_ready()
    if etcd is not None:
        reg = await Registry.connect(etcd, cluster)
        if static is not None:
            record["status"] = "ready"
        await reg.register("attn", node_id, record)
        follower = asyncio.create_task(
            _follow_placement(reg, Keys(cluster), cfg, backend, record, dispatch_timeout_s, became_ready, tls,
                              transport, checkpoint))
    await stop.wait()

    log.info("draining", running=engine_loop.num_running(), waiting=engine_loop.num_waiting())
    await set_health(NOT_SERVING)
    if reg is not None:
        record["status"] = "draining"
        await reg.update(record)
    await server.stop(grace=drain_timeout_s)  # in-flight Generate streams finish; new calls are refused
    if follower is not None:
        follower.cancel()
    engine_loop.stop()
    backend.close()
    if reg is not None:
        await reg.close()
    log.info("stopped")


async def _follow_placement(reg, keys, cfg, backend, record, dispatch_timeout_s, became_ready, tls,
                            transport="grpc", checkpoint="") -> None:
    view = ClusterView(keys)
    serving: Placement | None = None
    async for ev in reg.watch_prefix(keys.root):
        if not view.apply(ev):
            continue
        placement = view.serving_placement()
        if placement is None or placement == serving:
            continue
        current = backend.current
        if serving is not None and current is not None and _same_replicas(placement, serving):
            current.reroute(placement)  # only shares changed: keep the links (and torch groups)
            serving = placement
            record.update(status="ready", placement_version=placement.version)
            await reg.update(record)
            log.info("placement_shares_updated", version=placement.version)
            continue
        try:
            # --transport torch: each placement version gets new links, hence new pair groups (re-formed here)
            new = await asyncio.to_thread(RemoteExpertBackend, cfg, placement, dispatch_timeout_s, 10.0, tls,
                                          links_for(transport, cfg.hidden_size, dispatch_timeout_s, placement.version),
                                          checkpoint=checkpoint)
        except Exception as exc:  # a node went away between its record and our dial: wait for the next change
            log.warning("placement_connect_failed", version=placement.version, error=str(exc))
            continue
        await asyncio.to_thread(backend.install, new)  # takes effect between two engine steps
        first = serving is None
        serving = placement
        record.update(status="ready", placement_version=placement.version)
        await reg.update(record)
        log.info("placement_installed", version=placement.version, nodes=list(placement.nodes))
        if first:
            await became_ready()


def _same_replicas(a: Placement, b: Placement) -> bool:
    return a.nodes == b.nodes and a.replicas == b.replicas
