"""The leader's fast failure detector for expert nodes: one grpc.health.v1 Watch stream per node.

A node's etcd lease outlives the node by up to its TTL; a SIGKILLed process breaks its TCP connections at
once. A Watch stream that had answered and then fails is taken as the node being gone: it is ``down``
until the stream answers again (or its record leaves etcd). Planning skips down nodes, so the leader
re-plans their experts onto the survivors within milliseconds instead of seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.control.records import NodeRecord
from moemesh.logs import get_logger
from moemesh.wire.tls import TLSFiles
from moemesh.wire.tls import channel as tls_channel

log = get_logger("moemesh.router.expert_health")

RETRY_S = 0.5
CONFIRM_S = 0.5  # a node whose Watch broke must answer a Check within this, or it is down


class ExpertHealth:
    def __init__(self, on_change: Callable[[], None], tls: TLSFiles | None = None):
        self.on_change = on_change
        self.tls = tls
        self.down: set[str] = set()
        self._watches: dict[str, tuple[str, asyncio.Task]] = {}  # node id -> (address, task)

    def sync(self, records: list[NodeRecord]) -> None:
        """Watch exactly the nodes in ``records`` (expert node records)."""
        wanted = {r.id: r for r in records if r.address}
        for node_id in [n for n, (address, _) in self._watches.items()
                        if n not in wanted or wanted[n].address != address]:
            self._watches.pop(node_id)[1].cancel()
            self.down.discard(node_id)
        for node_id, record in wanted.items():
            if node_id not in self._watches:
                task = asyncio.get_running_loop().create_task(self._watch(node_id, record), name=f"health-{node_id}")
                self._watches[node_id] = (record.address, task)

    async def _watch(self, node_id: str, record: NodeRecord) -> None:
        address = record.address
        channel = tls_channel(address, self.tls if record.tls else None,
                              [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)],
                              aio=True)
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            while True:
                answered = False
                try:
                    async for _ in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                        answered = True
                        self._mark(node_id, down=False)
                except grpc.aio.AioRpcError as exc:
                    # One broken stream can be a blip: down only if a fresh Check fails too (a dead
                    # process refuses the connection at once, so this costs little).
                    if answered and not await _answers(stub):
                        log.warning("expert_node_unreachable", node=node_id, address=address, code=exc.code().name)
                        self._mark(node_id, down=True)
                except Exception:  # never let a watch die silently: log and watch again
                    log.exception("expert_health_watch_failed", node=node_id, address=address)
                await asyncio.sleep(RETRY_S)
        finally:
            await channel.close()

    def _mark(self, node_id: str, down: bool) -> None:
        if down == (node_id in self.down):
            return
        (self.down.add if down else self.down.discard)(node_id)
        if not down:
            log.info("expert_node_reachable", node=node_id)
        self.on_change()

    async def close(self) -> None:
        tasks = [task for _, task in self._watches.values()]
        self._watches.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _answers(stub: health_pb2_grpc.HealthStub, timeout_s: float = CONFIRM_S) -> bool:
    try:
        await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        return True
    except grpc.aio.AioRpcError:
        return False
