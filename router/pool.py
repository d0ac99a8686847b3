"""The attention nodes as the router reaches them: one channel per node, their loads, the try order.

Loads come from each node's Load RPC (short deadline), cached for ``load_max_age_s`` so a burst
of requests does not send a burst of Load calls; concurrent refreshes of one node share one call.
Between samples the router counts its own streams per node, and a node's queue is never taken to
be shorter than that count (so requests arriving together spread instead of piling on one node).

Given the request, ``ranked`` also puts the node holding the prompt's longest cached prefix first
unless it is overloaded (router/prefix_match.py has the scoring). The keys come from each node's Load
reply. A token-id prompt is hashed as it is; a text prompt of at least ``text_min_chars`` characters
is tokenized by the least-loaded ready node's Tokenize (once per request id: retries reuse it), as
the router has no tokenizer, with the request's own ``add_special_tokens`` (chat-rendered text carries
its BOS), so the ids are the ones the node will cache.
A failed Tokenize costs the request its prefix match, nothing else.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import replace

import grpc

from moemesh.control.cluster_view import ClusterView
from moemesh.control.records import NodeRecord
from moemesh.wire.limits import client_options
from moemesh.wire.tls import TLSFiles, channel as tls_channel
from moemesh.logs import get_logger
from moemesh.prefix_hash import block_hashes
from moemesh.v1 import attention_pb2, attention_pb2_grpc, dispatch_pb2, dispatch_pb2_grpc, inference_pb2

from .prefix_match import NodePrefixes, PrefixPolicy, prefer_prefix_holder
from .selection import NodeLoad, rank_nodes

log = get_logger("moemesh.router.pool")

CHANNEL_OPTIONS = client_options("attn")  # sizes, keepalive, fast reconnect: moemesh/wire/limits.py
MAX_TOKENIZE_CHARS = 1 << 20  # the attention node's Tokenize limit: longer text prompts are not matched
TOKENIZED_MEMO = 1024  # request ids whose tokenized text prompt is kept for their retries


class AttentionPool:
    def __init__(self, view: ClusterView, load_timeout_s: float = 0.5, load_max_age_s: float = 0.2,
                 tls: TLSFiles | None = None, prefix_policy: PrefixPolicy | None = PrefixPolicy(),
                 tokenize_timeout_s: float = 2.0):
        self.view = view
        self.tls = tls  # certificate and CA for attention nodes whose records say they serve TLS
        self.load_timeout_s = load_timeout_s
        self.load_max_age_s = load_max_age_s
        self._channels: dict[str, tuple[str, grpc.aio.Channel, attention_pb2_grpc.AttentionNodeStub]] = {}
        self._loads: dict[str, tuple[float, NodeLoad]] = {}
        self._pending: dict[str, asyncio.Task] = {}
        self.streams: dict[str, int] = {}  # this router's open Generate streams per node
        self.prefix_policy = prefix_policy  # None: load alone decides
        self.tokenize_timeout_s = tokenize_timeout_s
        self.prefixes: dict[str, NodePrefixes] = {}  # what each node's prefix cache holds, as far as known
        self._hops: dict[str, tuple] = {}  # node id -> its last Load reply's expert_hops
        self._tokenized: OrderedDict[tuple, list[int] | None] = OrderedDict()  # (request id, text) -> its ids

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
            self.prefixes.pop(node_id, None)
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

    async def expert_hops(self, records: list[NodeRecord]) -> list[tuple]:
        """Each attention node's per expert node hop summaries, from its Load reply (the cached one when
        fresh: ClusterStatus and the leader's plans read loads anyway); () for a node that did not answer."""
        loads = await asyncio.gather(*(self.load(r) for r in records))
        return [self._hops.get(load.node_id, ()) if load.known else () for load in loads]

    async def _fetch(self, record: NodeRecord) -> NodeLoad:
        node_id = record.id
        try:
            r = await self.stub(record).Load(attention_pb2.LoadRequest(), timeout=self.load_timeout_s)
            load = NodeLoad(node_id, r.running, r.waiting, r.cache_free_tokens, r.cache_total_tokens,
                            prompt_tokens=r.prompt_tokens, prefix_hit_tokens=r.prefix_hit_tokens,
                            cached_blocks=r.cached_blocks, evicted_blocks=r.evicted_blocks,
                            micro_batches=r.micro_batches)
            self.prefixes.setdefault(node_id, NodePrefixes()).report(r.prefix_hashes, r.block_size)
            self._hops[node_id] = tuple(r.expert_hops)
        except grpc.aio.AioRpcError as exc:
            log.warning("attn_load_failed", node=node_id, address=record.address, code=exc.code().name,
                        error=exc.details())
            load = NodeLoad(node_id, known=False)
            self._hops.pop(node_id, None)
        self._loads[node_id] = (time.monotonic(), load)
        return load

    def _with_streams(self, load: NodeLoad) -> NodeLoad:
        mine = self.streams.get(load.node_id, 0)
        if load.known and mine > load.queue:
            return replace(load, waiting=load.waiting + mine - load.queue)
        return load

    async def ranked(self, exclude: set[str] = frozenset(),
                     request: inference_pb2.GenerateRequest | None = None) -> list[tuple[NodeRecord, NodeLoad]]:
        """Ready attention nodes not in ``exclude``, best first, with their loads; given the Generate
        ``request``, the node caching its prompt's longest prefix first unless overloaded (module doc)."""
        self.prune()
        records = [r for r in self.view.ready_attention_nodes() if r.id not in exclude]
        if not records:
            return []
        loads = await asyncio.gather(*(self.load(r) for r in records))
        by_id = {r.id: r for r in records}
        order = rank_nodes([self._with_streams(x) for x in loads])
        if request is not None and self.prefix_policy is not None:
            order = await self._by_prefix(order, request, by_id)
        return [(by_id[load.node_id], load) for load in order]

    async def _by_prefix(self, order: list[NodeLoad], request, by_id: dict[str, NodeRecord]) -> list[NodeLoad]:
        ids = await self._prompt_ids(request, by_id[order[0].node_id])
        if not ids:
            return order
        now = time.monotonic()
        keys_by_size: dict[int, list[int]] = {}
        matched: dict[str, int] = {}
        for load in order:
            held = self.prefixes.get(load.node_id)
            if held is None or held.block_size < 1:
                continue
            keys = keys_by_size.get(held.block_size)
            if keys is None:
                keys = keys_by_size[held.block_size] = block_hashes(ids, held.block_size)
            matched[load.node_id] = held.matched_blocks(keys, now) * held.block_size
        order = prefer_prefix_holder(order, matched, self.prefix_policy)
        chosen = self.prefixes.get(order[0].node_id)
        if chosen is not None and chosen.block_size >= 1:  # it will hold this prompt's blocks soon
            chosen.note(keys_by_size.get(chosen.block_size) or block_hashes(ids, chosen.block_size), now)
        return order

    async def _prompt_ids(self, request, record: NodeRecord) -> list[int] | None:
        """The prompt's token ids for matching, or None when it is not matched (short or untokenizable text)."""
        kind = request.WhichOneof("prompt")
        if kind == "token_ids":
            return list(request.token_ids.ids)
        text = request.text if kind == "text" else ""
        if not self.prefix_policy.text_min_chars <= len(text) <= MAX_TOKENIZE_CHARS:
            return None
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        # Keyed by the request id AND the text: ids are the client's to choose, so two prompts may share one.
        key = (request.request_id, add, hashlib.blake2b(text.encode(), digest_size=16).digest())
        if request.request_id and key in self._tokenized:
            return self._tokenized[key]
        ids = await self._tokenize(record, inference_pb2.TokenizeRequest(text=text, add_special_tokens=add))
        if request.request_id:
            self._tokenized[key] = ids
            while len(self._tokenized) > TOKENIZED_MEMO:
                self._tokenized.popitem(last=False)
        return ids

    async def _tokenize(self, record: NodeRecord, request: inference_pb2.TokenizeRequest) -> list[int] | None:
        try:
            reply = await self.stub(record).Tokenize(request, timeout=self.tokenize_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.info("prefix_tokenize_failed", node=record.id, code=exc.code().name, error=exc.details())
            return None
        return list(reply.token_ids)

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
