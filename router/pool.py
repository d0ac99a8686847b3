"""The attention nodes as the router reaches them: one channel per node, their loads, the try order.

Loads come from each node's Load RPC (short deadline), cached for ``load_max_age_s`` so a burst
of requests does not send a burst of Load calls; concurrent refreshes of one node share one call.
Between samples the router counts its own streams per node, and a node's queue is never taken to
be shorter than that count (so requests arriving together spread instead of piling on one node).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import grpc

from moemesh.control.cluster_view import ClusterView
from moemesh.control.records import NodeRecord
from moemesh.wire.limits import client_options
from moemesh.wire.tls import TLSFiles, channel as tls_channel
from moemesh.logs import get_logger
from moemesh.v1 import attention_pb2, attention_pb2_grpc, dispatch_pb2, dispatch_pb2_grpc

from .selection import NodeLoad, rank_nodes

log = get_logger("moemesh.router.pool")

CHANNEL_OPTIONS = client_options("attn")  # sizes, keepalive, fast reconnect: moemesh/wire/limits.py


class AttentionPool:
    def __init__(self, view: ClusterView, load_timeout_s: float = 0.5, load_max_age_s: float = 0.2,
                 tls: TLSFiles | None = None):
        self.view = view
        self.tls = tls  # certificate and CA for attention nodes whose records say they serve TLS
        self.load_timeout_s = load_timeout_s
        self.load_max_age_s = load_max_age_s
        self._channels: dict[str, tuple[str, grpc.aio.Channel, attention_pb2_grpc.AttentionNodeStub]] = {}
        self._loads: dict[str, tuple[float, NodeLoad]] = {}
        self._pending: dict[str, asyncio.Task] = {}
        self.streams: dict[str, int] = {}  # this router's open Generate streams per node

    def stub(self, record: NodeRecord) -> attention_pb2_grpc.AttentionNodeStub:
        """The stub for a node record; a new channel when the node's address changed."""
        node_id, address = record.id, record.address
        held = self._channels.get(node_id)
        if held is not None and held[0] == address:
            return held[2]
        if held is not None:
            asyncio.get_running_loop().create_task(held[1].close())
        # TLS when the node says it serves TLS (its record's "tls"), with this router's certificate and CA.
        channel = tls_channel(address, self.tls if record.tls else None, CHANNEL_OPTIONS, aio=True)
        stub = attention_pb2_grpc.AttentionNodeStub(channel)
        self._channels[node_id] = (address, channel, stub)
        self._loads.pop(node_id, None)
        return stub

    def prune(self) -> None:
        """Close channels of nodes no longer in the view."""
        live = {r.id for r in self.view.records("attn")}
        for node_id in [n for n in self._channels if n not in live]:
            _, channel, _ = self._channels.pop(node_id)
            self._loads.pop(node_id, None)
            asyncio.get_running_loop().create_task(channel.close())

    def forget_load(self, node_id: str) -> None:
        """Drop a node's cached load (after it failed a call), so the next pick asks it again."""
        self._loads.pop(node_id, None)

    async def load(self, record: NodeRecord) -> NodeLoad:
        """The node's load, from the cache when fresh; ``known=False`` when it did not answer."""
        node_id = record.id
        self.stub(record)  # (re)opens the channel if the address changed, dropping a stale load
        cached = self._loads.get(node_id)
        if cached is not None and time.monotonic() - cached[0] < self.load_max_age_s:
            return cached[1]
        task = self._pending.get(node_id)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._fetch(record))
            self._pending[node_id] = task
        return await asyncio.shield(task)

    async def _fetch(self, record: NodeRecord) -> NodeLoad:
        node_id = record.id
        try:
            r = await self.stub(record).Load(attention_pb2.LoadRequest(), timeout=self.load_timeout_s)
            load = NodeLoad(node_id, r.running, r.waiting, r.cache_free_tokens, r.cache_total_tokens)
        except grpc.aio.AioRpcError as exc:
            log.warning("attn_load_failed", node=node_id, address=record.address, code=exc.code().name,
                        error=exc.details())
            load = NodeLoad(node_id, known=False)
        self._loads[node_id] = (time.monotonic(), load)
        return load

    def _with_streams(self, load: NodeLoad) -> NodeLoad:
        mine = self.streams.get(load.node_id, 0)
        if load.known and mine > load.queue:
            return replace(load, waiting=load.waiting + mine - load.queue)
        return load

    async def ranked(self, exclude: set[str] = frozenset()) -> list[tuple[NodeRecord, NodeLoad]]:
        """Ready attention nodes not in ``exclude``, best first, with their loads."""
        self.prune()
        records = [r for r in self.view.ready_attention_nodes() if r.id not in exclude]
        if not records:
            return []
        loads = await asyncio.gather(*(self.load(r) for r in records))
        by_id = {r.id: r for r in records}
        return [(by_id[load.node_id], load) for load in rank_nodes([self._with_streams(x) for x in loads])]

    async def expert_loads(self) -> tuple[dict[int, list[float]], int]:
        """Routed tokens per (MoE layer, expert) over the attention nodes' windows, summed; and how many answered."""
        records = self.view.ready_attention_nodes()
        replies = await asyncio.gather(
            *(self.stub(r).Load(attention_pb2.LoadRequest(), timeout=self.load_timeout_s) for r in records),
            return_exceptions=True)
        summed: dict[int, list[float]] = {}
        answered = 0
        for record, reply in zip(records, replies):
            if isinstance(reply, BaseException):
                log.warning("attn_expert_loads_failed", node=record.id, error=str(reply))
                continue
            answered += 1
            for layer_load in reply.expert_loads:
                row = summed.setdefault(layer_load.layer, [0.0] * len(layer_load.tokens))
                for e, tokens in enumerate(layer_load.tokens[: len(row)]):
                    row[e] += tokens
        return summed, answered

    async def expert_info(self, record: NodeRecord):
        """An expert node's Info (tokens computed, experts held), or None if it does not answer in time."""
        channel = tls_channel(record.address, self.tls if record.tls else None, CHANNEL_OPTIONS, aio=True)
        try:
            return await dispatch_pb2_grpc.ExpertDispatchStub(channel).Info(dispatch_pb2.InfoRequest(),
                                                                            timeout=self.load_timeout_s)
        except grpc.aio.AioRpcError:
            return None
        finally:
            await channel.close()

    async def close(self) -> None:
        for task in self._pending.values():
            task.cancel()
        channels, self._channels = self._channels, {}
        await asyncio.gather(*(ch.close() for _, ch, _ in channels.values()), return_exceptions=True)
