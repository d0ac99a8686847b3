"""Expert node under the control plane: register in etcd, host what the placement assigns, report ready.

The node binds first (health NOT_SERVING) and registers ``status: loading`` with its
capacity; when the leader router's placement names it, it loads exactly those
experts (dropping any it no longer owns), rewrites its record with what it hosts
and ``status: ready``, and turns health SERVING. SIGTERM: ``status: draining``,
finish in-flight messages, deregister, exit.
"""

from __future__ import annotations

import asyncio
import json
import signal

from grpc_health.v1 import health_pb2

from moemesh.cluster_view import ClusterView
from moemesh.config import ModelConfig
from moemesh.etcd import Keys, Registry
from moemesh.health_port import start_health_port
from moemesh.logs import get_logger
from moemesh.node_ids import advertise_address, default_node_id

from .loader import load_experts
from .server import SERVICE_NAME, DispatchService, create_server
from .shard import ExpertShard

log = get_logger("moemesh.expert_node.control")
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def serve_registered(model_dir: str, etcd: str, cluster: str, host: str, port: int, dtype, *,
                           node_id: str | None = None, slots: int | None = None, advertise: str | None = None,
                           drain_timeout_s: float = 30.0, tls=None, health_port: int | None = None,
                           transport: str = "grpc", torch_port: int = 0) -> None:
    cfg = ModelConfig.from_dir(model_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    shard = ExpertShard(cfg.n_routed_experts, dtype)
    service = DispatchService(shard, cfg)
    server, bound, health = create_server(service, host, port, tls)
    torch_transport = None
    if transport == "torch":  # TorchTransport sessions beside ExpertDispatch (the fallback)
        from .torch_server import attach

        torch_transport = attach(server, lambda: service, advertise_address(host, 0, advertise).rpartition(":")[0],
                                 torch_port)
    await server.start()
    health_server = await start_health_port(health, host, health_port)  # noqa: F841 (kept alive)
    for name in ("", SERVICE_NAME):
        await health.set(name, NOT_SERVING)
    node_id = node_id or default_node_id("expert", bound)
    keys = Keys(cluster)
    reg = await Registry.connect(etcd, cluster)
    record = {
        "address": advertise_address(host, bound, advertise), "status": "loading", "experts": {},
        "tls": tls is not None,
        "capacity": {"slots": slots or cfg.n_routed_experts, "moe_layers": list(cfg.moe_layers),
                     "n_routed_experts": cfg.n_routed_experts},
    }
    if torch_transport is not None:
        record["torch_store"] = torch_transport.store_address  # the rendezvous: where pair groups meet
    await reg.register("expert", node_id, record)
    log.info("registered", node_id=node_id, address=record["address"], etcd=etcd)
    watcher = asyncio.create_task(_follow_placement(reg, keys, node_id, record, shard, service, model_dir, cfg,
                                                    dtype, health))
    await stop.wait()
    watcher.cancel()
    log.info("draining", in_flight=service.in_flight)
    record["status"] = "draining"
    await reg.update(record)
    for name in ("", SERVICE_NAME):
        await health.set(name, NOT_SERVING)
    service.drain()
    if torch_transport is not None:
        torch_transport.drain()
    deadline = loop.time() + drain_timeout_s
    while service.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.01)
    await server.stop(grace=1.0)
    if torch_transport is not None:
        await torch_transport.wait_closed(drain_timeout_s)
    await reg.close()
    log.info("stopped")


async def _follow_placement(reg, keys, node_id, record, shard, service, model_dir, cfg, dtype, health) -> None:
    view = ClusterView(keys)
    announced = False
    async for ev in reg.watch_prefix(keys.root):
        if not view.apply(ev) or ev.key != keys.placement():
            continue
        want = view.assignment(node_id)
        have = shard.hosted()
        if want == have and record["status"] == "ready":
            continue
        add = {layer: [e for e in ids if e not in have.get(layer, [])] for layer, ids in want.items()}
        add = {layer: ids for layer, ids in add.items() if ids}
        drop = {layer: [e for e in ids if e not in want.get(layer, [])] for layer, ids in have.items()}
        log.info("placement", version=view.placement_version, load=sum(map(len, add.values())),
                 drop=sum(map(len, drop.values())))
        # On the worker thread that runs expert math, so a load never races a computation.
        await asyncio.get_running_loop().run_in_executor(
            service._worker, _apply, shard, model_dir, cfg, dtype, add, drop)
        record.update(status="ready", experts={str(layer): ids for layer, ids in shard.hosted().items()},
                      placement_version=view.placement_version)
        await reg.update(record)
        for name in ("", SERVICE_NAME):
            await health.set(name, SERVING)
        if not announced:
            announced = True
            print(json.dumps({"event": "ready", "port": int(record["address"].rsplit(":", 1)[1]),
                              "node_id": node_id}), flush=True)


def _apply(shard: ExpertShard, model_dir: str, cfg: ModelConfig, dtype, add: dict, drop: dict) -> None:
    if add:
        load_experts(shard, model_dir, cfg, add, dtype, progress=False)
    for layer, ids in drop.items():
        if ids:
            shard.drop_experts(layer, ids)
