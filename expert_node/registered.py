"""Expert node under the control plane: register in etcd, host what the placement assigns, report ready.

The node binds first (health NOT_SERVING) and registers ``status: loading`` with its capacity. A placement
version is applied in two phases so no attention node ever routes to an expert that is gone:

1. load the experts the new version assigns and this node lacks, keep the ones it no longer assigns,
   then publish ``experts`` (everything held) and ``placement_version`` in the record (attention
   nodes switch once every expert node has published its share);
2. once every attention node serves that version (its record's ``placement_version``), drop the
   experts the version no longer assigns here.

SIGTERM drains: ``status: draining``, and the leader plans the node away; the node keeps serving until
no placement names it and every attention node has moved on (or ``drain_timeout_s``, or at once when
there is no other live expert node or no leader to plan it away), then finishes in-flight messages,
deregisters and exits.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from grpc_health.v1 import health_pb2

from moemesh.model.checkpoint import checkpoint_fingerprint
from moemesh.control.cluster_view import ClusterView
from moemesh.model.config import ModelConfig
from moemesh.control.etcd import Registry
from moemesh.control.records import Capacity, NodeRecord
from moemesh.wire.health_port import start_health_port
from moemesh.logs import get_logger
from moemesh.control.node_ids import advertise_address, default_node_id
from moemesh.wire.limits import DEFAULT_MAX_BATCHED_TOKENS

from .loader import default_fused_moe, load_experts, new_expert_shard
from .server import SERVICE_NAME, TORCH_SERVICE_NAME, DispatchService, dispatch_server, message_limit, shut_down
from .shard import ExpertShard

log = get_logger("moemesh.expert_node.registered")
TICK_S = 1.0  # look again even without etcd events (retry a failed load)
FAILURES_BEFORE_FAILED = 3  # consecutive failed applies before the record says "failed"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def serve_registered(model_dir: str, etcd: str, cluster: str, host: str, port: int, dtype, *,
                           node_id: str | None = None, slots: int | None = None, advertise: str | None = None,
                           zone: str | None = None,
                           drain_timeout_s: float = 30.0, tls=None, health_port: int | None = None,
                           transport: str = "grpc", torch_port: int = 0, device: torch.device | str = "cpu",
                           keep_fp8: bool = False, etcd_credentials=None,
                           max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS) -> None:
    """``device``: where the experts live and compute (resolved by the caller); ``keep_fp8``: FP8 checkpoints'
    experts stay e4m3 there, also those loaded later as placements change; ``etcd_credentials``: an
    EtcdCredentials for a secured etcd (TLS, auth), or None; ``max_batched_tokens``: the largest step
    attention nodes send (sizes the message limit)."""
    cfg = ModelConfig.from_dir(model_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    shard = new_expert_shard(cfg, dtype, default_fused_moe(device), device=device, keep_fp8=keep_fp8)
    checkpoint = checkpoint_fingerprint(model_dir)
    service = DispatchService(shard, cfg, checkpoint, message_limit(cfg, max_batched_tokens))
    server, bound, health = dispatch_server(service, host, port, tls,
                                            (TORCH_SERVICE_NAME,) if transport == "torch" else ())
    torch_transport = None
    if transport == "torch":  # TorchTransport sessions beside ExpertDispatch (the fallback)
        from .torch_server import attach

        torch_transport = attach(server, lambda: service, advertise_address(host, 0, advertise).rpartition(":")[0],
                                 torch_port, device)
    await server.start()
    health_server = await start_health_port(health, host, health_port)  # noqa: F841 (kept alive)
    for name in ("", SERVICE_NAME):
        await health.set(name, NOT_SERVING)
    node_id = node_id or default_node_id("expert", bound)
    reg = await Registry.connect(etcd, cluster, credentials=etcd_credentials)
    record = NodeRecord(
        node_id, "expert", advertise_address(host, bound, advertise), "loading", experts={}, tls=tls is not None,
        capacity=Capacity(moe_layers=tuple(cfg.moe_layers), n_routed_experts=cfg.n_routed_experts,
                          slots=slots, checkpoint=checkpoint),
        zone=zone,
        # The rendezvous: where torch pair groups meet.
        torch_store=None if torch_transport is None else torch_transport.store_address)
    await reg.register(record)
    log.info("registered", node_id=node_id, address=record.address, etcd=etcd)
    node = ShardFollower(reg, node_id, shard, service, model_dir, cfg, dtype, health)
    watcher = asyncio.create_task(node.follow())
    await stop.wait()
    log.info("draining", in_flight=service.in_flight)
    await reg.update(status="draining")
    try:
        await asyncio.wait_for(node.planned_away.wait(), drain_timeout_s)
        log.info("planned_away", placement_version=node.view.placement_version)
    except asyncio.TimeoutError:
        log.warning("drain_timeout", seconds=drain_timeout_s, note="exiting while a placement may still name this "
                    "node; attention nodes fail over to replicas or wait for the leader's re-plan")
    watcher.cancel()
    await shut_down(server, service, health, drain_timeout_s, torch_transport)
    await reg.close()
    log.info("stopped")


class ShardFollower:
    """Watches the cluster and applies placement versions to the shard in two phases (module docstring)."""

    def __init__(self, reg, node_id, shard, service, model_dir, cfg, dtype, health):
        self.reg, self.node_id = reg, node_id
        self.shard, self.service, self.model_dir, self.cfg, self.dtype = shard, service, model_dir, cfg, dtype
        self.health = health
        self.view = ClusterView()
        self.loaded_version = -1
        self.planned_away = asyncio.Event()
        self._announced = False
        self.failures, self.retry_at = 0, 0.0
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-loader")

    async def follow(self) -> None:
        async for batch in self.reg.watch_cluster(TICK_S):
            for ev in batch:
                self.view.apply(ev)
            try:
                await self._step()
                self.failures = 0
            except Exception as exc:  # never stop following: log, back off, try again
                self.failures += 1
                self.retry_at = time.monotonic() + min(0.5 * 2 ** self.failures, 10.0)
                log.exception("placement_apply_failed", failures=self.failures)
                if self.failures == FAILURES_BEFORE_FAILED and not self.draining:
                    # The leader plans around a failed node instead of waiting for it forever.
                    await self._publish(status="failed", error=str(exc)[:500])

    async def _step(self) -> None:
        due = time.monotonic() >= self.retry_at
        if self.view.placement is not None and self.view.placement_version != self.loaded_version and due:
            await self._load_version()
        await self._drop_unassigned()
        self._check_planned_away()

    async def _on_loader(self, fn, *args):
        # Not on the expert-math thread: a load can take seconds and must not hold up Dispatch messages. It is
        # safe beside computations: ExpertShard builds a new immutable layer snapshot and swaps it in, and a
        # computation keeps the snapshot it started with (loads and drops themselves run one at a time here).
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    async def _load_version(self) -> None:
        version, want, have = self.view.placement_version, self.view.assignment(self.node_id), self.shard.hosted()
        add = {layer: [e for e in ids if e not in have.get(layer, [])] for layer, ids in want.items()}
        add = {layer: ids for layer, ids in add.items() if ids}
        log.info("placement_loading", version=version, load=sum(map(len, add.values())))
        if add:
            await self._on_loader(load_experts, self.shard, self.model_dir, self.cfg, add, self.dtype, False)
        self.loaded_version = self.service.placement_version = version
        await self._publish(status="draining" if self.draining else "ready", error=None)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, SERVING)
        if not self._announced:
            self._announced = True
            print(json.dumps({"event": "ready", "port": int(self.reg.record.address.rsplit(":", 1)[1]),
                              "node_id": self.node_id}), flush=True)

    async def _drop_unassigned(self) -> None:
        """Phase 2: drop what the loaded version no longer assigns here, once no attention node can route to it."""
        version = self.loaded_version
        if version < 0 or self.view.attention_behind(version):
            return
        want = self.view.assignment(self.node_id)
        drop = {layer: [e for e in ids if e not in want.get(layer, [])] for layer, ids in self.shard.hosted().items()}
        drop = {layer: ids for layer, ids in drop.items() if ids}
        if not drop:
            return
        log.info("placement_dropping", version=version, drop=sum(map(len, drop.values())))
        # Publish the smaller set first: nobody may read "hosted" from the record while the drop runs.
        keep = {layer: [e for e in ids if e not in drop.get(layer, [])] for layer, ids in self.shard.hosted().items()}
        await self._publish(experts={layer: tuple(ids) for layer, ids in keep.items() if ids})
        await self._on_loader(_drop, self.shard, drop)
        await self._publish()

    async def _publish(self, **fields) -> None:
        fields.setdefault("experts", {layer: tuple(ids) for layer, ids in self.shard.hosted().items()})
        await self.reg.update(**fields, placement_version=self.loaded_version)

    @property
    def draining(self) -> bool:
        return self.reg.record.status == "draining"

    def _check_planned_away(self) -> None:
        """While draining: done when no placement names this node and attention nodes have moved on, or when no
        re-plan can come (no leader, or no other live expert node to take over)."""
        if not self.draining or self.planned_away.is_set():
            return
        others = [r for r in self.view.records("expert")
                  if r.id != self.node_id and r.status not in ("draining", "failed")]
        moved_on = not self.view.in_placement(self.node_id) and not self.view.attention_behind(
            self.view.placement_version)
        if moved_on or not others or self.view.leader is None:
            self.planned_away.set()


def _drop(shard: ExpertShard, drop: dict) -> None:
    for layer, ids in drop.items():
        shard.drop_experts(layer, ids)
