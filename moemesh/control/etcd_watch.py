"""Prefix watches over etcd that survive outages: a snapshot, then live events, re-snapshot on reconnect.

Split from ``etcd.py`` (the Registry) so the watch loop reads on its own. :class:`PrefixWatches` is mixed into
``Registry`` and uses what the Registry owns: ``_client`` (the aetcd client, renewed after a refused token),
``_rpc`` (deadlines, mapping to RegistryError), ``keys``, ``endpoint``, ``_closed`` and ``_closed_event``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal

import aetcd

from moemesh.control.etcd_client import RegistryError
from moemesh.logs import get_logger

log = get_logger("moemesh.control.etcd")


def _decode(raw: bytes, key: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        log.warning("etcd_value_not_json", key=key)
        return raw.decode(errors="replace")


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched prefix. ``snapshot``: part of the state sent on (re)connect."""

    kind: Literal["put", "delete"]
    key: str
    value: Any  # decoded JSON; None for deletes
    revision: int
    snapshot: bool = False


async def next_batch(events: asyncio.Queue, tick_s: float) -> list:
    """Every item queued now, waiting up to ``tick_s`` for the first; ``[]`` if none came.

    Not ``asyncio.wait_for(events.get(), tick_s)``: before Python 3.12 it returns the item and drops the
    cancellation when both land together (python/cpython#86296), so a consumer cancelled while events
    keep arriving (a router stopping while expert nodes exit) would loop on and its stop would hang.
    """
    batch = []
    if events.empty():
        getter = asyncio.ensure_future(events.get())
        try:
            done, _ = await asyncio.wait({getter}, timeout=tick_s)
        finally:
            if not getter.done():
                getter.cancel()
        if not done:
            return []
        batch.append(getter.result())
    while not events.empty():
        batch.append(events.get_nowait())
    return batch


class PrefixWatches:
    """The Registry's watch methods (see the module docstring for the attributes they use)."""

    async def watch_batches(self, prefix: str, tick_s: float) -> AsyncIterator[list[WatchEvent]]:
        """:meth:`watch_prefix` in batches: every event that arrived since the last batch, or ``[]`` after
        ``tick_s`` without one (so a follower also re-checks its state when etcd is quiet, e.g. to retry)."""
        events: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            async for ev in self.watch_prefix(prefix):
                events.put_nowait(ev)

        task = asyncio.create_task(pump(), name=f"watch-{prefix}")
        try:
            while True:
                yield await next_batch(events, tick_s)
        finally:
            task.cancel()

    async def watch_prefix(self, prefix: str) -> AsyncIterator[WatchEvent]:
        """Yield a snapshot of ``prefix`` then live changes; re-snapshot after every reconnect.

        Runs until the Registry is closed or the consumer stops iterating. Never raises for etcd
        outages: it retries with backoff (up to 1 s apart) and logs once per outage.
        """
        prefix_b = self.keys.check(prefix).encode()
        known: set[str] = set()
        backoff, failing = 0.1, False
        while not self._closed:
            watch = None
            try:
                snap = await self._rpc(self._client.get_prefix(prefix_b), f"list {prefix}")
                revision = snap.header.revision
                watch = await self._rpc(self._client.watch_prefix(prefix_b, start_revision=revision + 1),
                                        f"watch {prefix}")
            except RegistryError as e:
                if not failing and not self._closed:
                    log.warning("etcd_watch_retrying", prefix=prefix, endpoint=self.endpoint, error=str(e))
                failing = True
                await self._sleep_unless_closed(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if failing:
                log.info("etcd_watch_resumed", prefix=prefix, endpoint=self.endpoint, revision=revision)
            backoff, failing = 0.1, False
            try:
                present = set()
                for kv in snap:
                    key = kv.key.decode()
                    present.add(key)
                    yield WatchEvent("put", key, _decode(kv.value, key), kv.mod_revision, snapshot=True)
                for key in sorted(known - present):
                    yield WatchEvent("delete", key, None, revision, snapshot=True)
                known = present
                async for ev in watch:
                    key = ev.kv.key.decode()
                    if ev.kind == "PUT":
                        known.add(key)
                        yield WatchEvent("put", key, _decode(ev.kv.value, key), ev.kv.mod_revision)
                    else:
                        known.discard(key)
                        yield WatchEvent("delete", key, None, ev.kv.mod_revision)
            except aetcd.ClientError as e:
                if not self._closed:
                    log.warning("etcd_watch_broken", prefix=prefix, endpoint=self.endpoint, error=str(e))
                    failing = True
            finally:
                await self._cancel_watch(watch)
            await self._sleep_unless_closed(backoff)

    async def _sleep_unless_closed(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self._closed_event.wait(), delay)
        except asyncio.TimeoutError:
            pass

    async def _cancel_watch(self, watch) -> None:
        try:
            await asyncio.wait_for(watch.cancel(), 1.0)
        except Exception:  # the stream is already gone
            pass
