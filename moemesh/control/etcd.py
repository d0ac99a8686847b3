"""The one module that talks to etcd: node registry, watches, compare-and-swap and leader election.

Nothing else in moemesh imports an etcd client; components hold a :class:`Registry`. Roles read the
cluster as typed records and events (``watch_cluster``, ``read_cluster``, ``placement_entry``,
``write_placement``, ``campaign_leader``; ``moemesh/control/records.py`` and ``events.py``), so key names
(:class:`Keys`) stay inside moemesh.control. The client is ``aetcd`` (asyncio).

Security: ``Registry.connect(..., credentials=EtcdCredentials(...))`` (``moemesh/control/etcd_credentials.py``)
dials etcd over TLS (a CA, a client certificate) and/or signs in as a user. aetcd 1.0 does user + password
but dials only plaintext (TLS is its open issue martyanov/aetcd#37), so ``etcd_client.py``'s ``_TLSClient`` is aetcd's client
with a TLS channel: the one place that knows aetcd's connect. A token etcd stops accepting (etcd restarted,
or the token's TTL ran out) is answered by a fresh client that signs in again; the call that met it raises
RegistryUnavailable, which every retrying loop here already handles.

Keys (all under ``/moemesh/<cluster>/``, values are JSON)::

    nodes/<role>/<node_id>   node record, bound to the node's lease (gone when the process dies)
    leader                   router leader: the leader's id as a JSON string, bound to its lease
    placement                expert placement, written by the leader with put_if_version (no lease)

Node record (a :class:`NodeRecord` given to ``register()``, changed by ``update(**fields)``)::

    {"id": "expert-0", "role": "attn" | "expert", "address": "HOST:PORT",
     "status": "loading" | "ready" | "draining" | "failed",
     "capacity": {...},                  # role-specific, e.g. {"slots": 16} or {"kv_cache_tokens": 4096}
     "experts": {"<layer>": [ids]},      # expert nodes: what they host now (JSON keys are strings)
     "placement_version": int,           # the placement version the node has applied
     "tls": bool, "torch_store": "HOST:PORT", "error": "...", "zone": "Z"}   # optional (see records.NodeRecord)

Placement::

    {"version": int, "layers": {"<layer>": {"<expert>": ["node id", ...]}},
     "shares": {...}, "stats": {...}}    # optional (see records.PlacementRecord)

Sessions: a Registry owns one etcd lease (TTL ``ttl_s``), refreshed every TTL/3 by a background
task. If the lease is lost (etcd restarted with fresh data, a pause longer than the TTL, an
operator revoke), the task grants a new lease and writes the node record again, with backoff;
while etcd is unreachable it keeps retrying and never raises into the caller. After any outage the
record is rewritten once, so a record that failed to update is eventually written. Leadership is
bound to the lease too: a lost lease is lost leadership; callers re-``campaign()`` periodically
(campaign is idempotent and says whether this registry holds the key).

Watches: ``watch_prefix()`` first yields a snapshot of the keys present now (``snapshot=True``),
then live events. When the stream breaks (etcd restarted or unreachable), it reconnects with
backoff and yields a fresh snapshot: a put for every key present, and a delete for every key seen
before that is gone. A consumer that applies events to a dict stays correct across outages (compare
values, not revisions: an etcd that lost its data starts counting revisions again).

One-shot calls (get, list, put_if_version, campaign, leader, ...) have deadlines and raise
:class:`RegistryUnavailable`, naming the endpoint, when etcd does not answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, AsyncIterator, Literal

import aetcd
import aetcd.client
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher

from moemesh.control.etcd_client import (  # noqa: F401  (the errors are re-exported)
    RegistryError, RegistryUnavailable, _new_client, _refusal_hint, _token_refused,
)
from moemesh.control.etcd_credentials import EtcdCredentials
from moemesh.control.etcd_watch import (  # noqa: F401  (WatchEvent, next_batch re-exported)
    PrefixWatches, WatchEvent, _decode, next_batch,
)
from moemesh.logs import get_logger
from moemesh.wire.limits import client_options

log = get_logger("moemesh.control.etcd")


# ---- keys and records (pure) --------------------------------------------------
from moemesh.control.keys import (  # noqa: E402,F401  (re-exported: callers import them from here too)
    ROLES, STATUSES, Keys, check_cluster_name, check_node_record, check_placement, parse_endpoint,
)
from moemesh.control.events import ClusterEvent, ClusterEvents  # noqa: E402
from moemesh.control.records import NodeRecord, PlacementRecord  # noqa: E402


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# ---- what the registry hands out -----------------------------------------------
@dataclass(frozen=True)
class Entry:
    key: str
    value: Any
    mod_revision: int
    create_revision: int
    lease: int  # 0: not bound to a lease


@dataclass(frozen=True)
class LeaseInfo:
    id: int
    ttl: int  # seconds left; -1 when the lease no longer exists
    granted_ttl: int
    keys: tuple[str, ...]


@dataclass
class _Registration:
    key: str
    record: NodeRecord


def _checked(record: Mapping[str, Any]) -> NodeRecord:
    """A node record about to be written, checked as every reader will check it."""
    return NodeRecord.from_json(dict(record))


# ---- the registry --------------------------------------------------------------
class Registry(PrefixWatches):
    """One process's view of the cluster in etcd: its lease, its node record, watches, election."""

    def __init__(self, client: aetcd.Client, endpoint: str, keys: Keys, ttl_s: float, timeout_s: float,
                 new_client=None):
        self._client = client
        self._new_client = new_client  # a fresh client (signs in again), for a token etcd stopped accepting
        self.endpoint = endpoint
        self.keys = keys
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._lease: int | None = None
        self._granted_ttl = max(2, math.ceil(ttl_s))
        self._registration: _Registration | None = None
        self._leader_keys: dict[str, str] = {}  # leader key -> my id, while we believe we hold it
        self._dirty = False  # the record must be (re)written once etcd answers
        self._stale_key: str | None = None  # a deregistered record still to delete
        self._lock = asyncio.Lock()  # lease grant and record writes
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self._closed_event = asyncio.Event()
        self.lease_grants = 0  # how many leases this registry has granted (1 + re-registrations)

    @classmethod
    async def connect(cls, endpoint: str, cluster: str = "default", ttl_s: float = 5.0,
                      timeout_s: float = 3.0, credentials: EtcdCredentials | None = None) -> "Registry":
        """Open a client to ``HOST:PORT`` and check that etcd answers (RegistryUnavailable if not).

        ``credentials``: TLS files and/or user + password (:class:`EtcdCredentials`); None = plaintext, anonymous.
        A secured etcd refusing them is a RegistryError saying which flags to check.
        """
        if ttl_s <= 0 or timeout_s <= 0:
            raise ValueError(f"ttl_s and timeout_s must be > 0, got {ttl_s} and {timeout_s}")
        host, port = parse_endpoint(endpoint)
        keys = Keys(cluster)
        options = dict(client_options("etcd"))  # sizes, keepalive, fast reconnect: moemesh/wire/limits.py

        def new_client() -> aetcd.Client:
            return _new_client(host, port, timeout_s, options, credentials)

        reg = cls(new_client(), f"{host}:{port}", keys, ttl_s, timeout_s, new_client)
        client = reg._client
        try:
            await reg._rpc(client.get(keys.leader().encode()), "connect")
        except BaseException:
            await reg._close_client()
            raise
        return reg

    # ---- node registration -------------------------------------------------------
    async def register(self, record: NodeRecord) -> bool:
        """Write this node's record under ``nodes/<role>/<id>``, bound to the lease, and keep it there.

        Returns True when written now; False when etcd did not answer (the background task keeps
        trying; it never raises into the caller).
        """
        record = _checked(record.to_json())
        key = self.keys.node(record.role, record.id)
        if self._registration is not None and self._registration.key != key:
            raise ValueError(f"this Registry already registered {self._registration.key}; use one per node")
        self._registration = _Registration(key, record)
        return await self._write_record("register")

    @property
    def record(self) -> NodeRecord | None:
        """This node's record as last written (or about to be), None before :meth:`register`."""
        return None if self._registration is None else self._registration.record

    async def update(self, **changes: Any) -> bool:
        """Change fields of the node record (``status="draining"``, ``placement_version=3``, ``error=None``...)
        and rewrite it (same key, same lease); True if written now, else written later.

        The record lives here, so every part of the node that changes it (the serving loop, the placement
        follower) changes the one record, and a change never undoes another's.
        """
        if self._registration is None:
            raise RuntimeError("update() before register()")
        reg = self._registration
        reg.record = _checked(dataclasses.replace(reg.record, **changes).to_json())
        return await self._write_record("update")

    async def deregister(self) -> None:
        """Delete the node record (its lease stays, for leadership).

        Raises RegistryUnavailable if etcd does not answer; the keep-alive task deletes it later.
        """
        registration, self._registration = self._registration, None
        self._dirty = False
        if registration is not None:
            self._stale_key = registration.key
            async with self._lock:
                await self._delete_stale()

    async def _delete_stale(self) -> None:
        """Under the lock: delete a deregistered record (it is bound to a lease we keep alive)."""
        if self._stale_key is not None:
            await self._rpc(self._client.delete(self._stale_key.encode()), f"delete {self._stale_key}")
            log.info("etcd_deregistered", key=self._stale_key)
            self._stale_key = None

    @property
    def registered(self) -> bool:
        """True while a record is registered and the last write of it succeeded."""
        return self._registration is not None and self._lease is not None and not self._dirty

    @property
    def lease_id(self) -> int | None:
        return self._lease

    async def _write_record(self, what: str) -> bool:
        self._ensure_task()
        try:
            async with self._lock:
                await self._ensure_lease()
                await self._put_record()
            return True
        except RegistryError as e:
            self._dirty = True
            self._wake.set()
            log.warning("etcd_write_deferred", op=what, key=self._registration.key, error=str(e))
            return False

    async def _put_record(self) -> None:
        """Under the lock, with a lease: write the record (if any)."""
        reg = self._registration
        if reg is not None:
            await self._rpc(self._client.put(reg.key.encode(), _encode(reg.record.to_json()), lease=self._lease),
                            f"put {reg.key}")
        self._dirty = False

    async def _ensure_lease(self) -> int:
        """Under the lock: the current lease, granting one if there is none."""
        if self._lease is None:
            lease = await self._rpc(self._client.lease(max(2, math.ceil(self.ttl_s))), "lease grant")
            self._lease, self._granted_ttl = lease.id, lease.ttl
            self.lease_grants += 1
            log.info("etcd_lease_granted", lease=f"{lease.id:x}", ttl=lease.ttl, endpoint=self.endpoint)
        return self._lease

    # ---- keep-alive --------------------------------------------------------------
    def _ensure_task(self) -> None:
        if self._closed:
            raise RuntimeError("Registry is closed")
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._keepalive(), name="moemesh-etcd-keepalive")

    async def _keepalive(self) -> None:
        """Refresh the lease every TTL/3; on loss grant a new one and rewrite the record. Never raises."""
        backoff, failing = 0.1, False
        while not self._closed:
            self._wake.clear()
            interval = max(0.2, self._granted_ttl / 3)
            delay = interval
            try:
                async with self._lock:
                    if self._lease is not None:
                        ttl = await self._refresh(self._lease, timeout_s=min(self.timeout_s, interval))
                        if ttl <= 0:
                            log.warning("etcd_lease_lost", lease=f"{self._lease:x}", endpoint=self.endpoint,
                                        key=self._registration and self._registration.key)
                            self._lease, self._stale_key = None, None
                            self._leader_keys.clear()
                            self._dirty = self._registration is not None
                        else:
                            await self._delete_stale()
                    if self._registration is not None and (self._lease is None or self._dirty):
                        await self._ensure_lease()
                        await self._put_record()
                        log.info("etcd_registered", key=self._registration.key, lease=f"{self._lease:x}")
                if failing:
                    log.info("etcd_reachable_again", endpoint=self.endpoint)
                failing, backoff = False, 0.1
            except RegistryError as e:
                if not failing:
                    log.warning("etcd_keepalive_failed", endpoint=self.endpoint, error=str(e))
                failing = True
                self._dirty = self._registration is not None  # rewrite once etcd answers again
                delay, backoff = backoff, min(backoff * 2, interval)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not kill the session: log it and keep going
                log.exception("etcd_keepalive_error", endpoint=self.endpoint)
                delay = interval
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _refresh(self, lease: int, timeout_s: float) -> int:
        reply = await self._rpc(self._client.refresh_lease(lease), "lease keep-alive", timeout_s)
        return reply.TTL if reply is not None else 0

    async def lease_info(self, lease_id: int | None = None) -> LeaseInfo | None:
        """TTL left, granted TTL and keys of a lease (ours by default); None if we hold none."""
        lease_id = self._lease if lease_id is None else lease_id
        if lease_id is None:
            return None
        info = await self._rpc(self._client.get_lease_info(lease_id, keys=True), "lease info")
        return LeaseInfo(lease_id, info.TTL, info.grantedTTL, tuple(k.decode() for k in info.keys))

    # ---- reads, watches, compare-and-swap -----------------------------------------
    async def get(self, key: str) -> Any:
        """The decoded value at ``key``, or None."""
        entry = await self.get_entry(key)
        return None if entry is None else entry.value

    async def get_entry(self, key: str) -> Entry | None:
        """Value plus revisions and lease (``mod_revision`` is what put_if_version compares)."""
        kv = await self._rpc(self._client.get(self.keys.check(key).encode()), f"get {key}")
        if kv is None:
            return None
        return Entry(key, _decode(kv.value, key), kv.mod_revision, kv.create_revision, kv.lease)

    async def list(self, prefix: str) -> dict[str, Any]:
        """Every key under ``prefix`` with its decoded value."""
        rng = await self._rpc(self._client.get_prefix(self.keys.check(prefix).encode()), f"list {prefix}")
        return {kv.key.decode(): _decode(kv.value, kv.key.decode()) for kv in rng}

    async def put_if_version(self, key: str, value: Any, expected_mod_revision: int) -> bool:
        """Compare-and-swap: write ``value`` (no lease) iff the key's mod_revision is as expected.

        ``expected_mod_revision=0`` means "only if absent". Read the current one with get_entry().
        """
        key = self.keys.check(key)
        tx = self._client.transactions
        ok, _ = await self._rpc(self._client.transaction(
            compare=[tx.mod(key.encode()) == int(expected_mod_revision)],
            success=[tx.put(key.encode(), _encode(value))],
            failure=[],
        ), f"put_if_version {key}")
        return bool(ok)

    # ---- the cluster, typed (roles use these, not key names) ------------------------
    async def read_cluster(self) -> list[ClusterEvent]:
        """One listing of the cluster root as typed events (what a watch's first snapshot would say)."""
        events = ClusterEvents(self.keys)
        decoded = (events.decode("put", key, value) for key, value in (await self.list(self.keys.root)).items())
        return [ev for ev in decoded if ev is not None]

    async def watch_cluster(self, tick_s: float) -> AsyncIterator[list[ClusterEvent]]:
        """:meth:`watch_batches` on the cluster root, as typed events (``moemesh/control/events.py``)."""
        events = ClusterEvents(self.keys)
        async for batch in self.watch_batches(self.keys.root, tick_s):
            decoded = (events.decode(ev.kind, ev.key, ev.value) for ev in batch)
            yield [ev for ev in decoded if ev is not None]

    async def placement_entry(self) -> Entry | None:
        """The stored placement (its raw value, which may not parse) and its mod_revision, or None."""
        return await self.get_entry(self.keys.placement())

    async def write_placement(self, placement: PlacementRecord, expected_mod_revision: int) -> bool:
        """Compare-and-swap the placement (see :meth:`put_if_version`)."""
        return await self.put_if_version(self.keys.placement(), placement.to_json(), expected_mod_revision)

    async def campaign_leader(self, my_id: str) -> bool:
        """:meth:`campaign` for the cluster's router leader key."""
        return await self.campaign(self.keys.leader(), my_id)

    # ---- leader election ----------------------------------------------------------
    async def campaign(self, leader_key: str, my_id: str) -> bool:
        """Become leader if nobody is: create ``leader_key`` = my_id bound to our lease, atomically.

        True if this registry holds the key now (newly or already); False if another does.
        Idempotent: call it periodically; after a lost lease it returns False until it wins again.
        """
        key = self.keys.check(leader_key)
        self._ensure_task()
        async with self._lock:
            lease = await self._ensure_lease()
        tx = self._client.transactions
        ok, responses = await self._rpc(self._client.transaction(
            compare=[tx.create(key.encode()) == 0],
            success=[tx.put(key.encode(), _encode(my_id), lease=lease)],
            failure=[tx.get(key.encode())],
        ), f"campaign {key}")
        if ok:
            self._leader_keys[key] = my_id
            log.info("etcd_elected", key=key, id=my_id, lease=f"{lease:x}")
            return True
        current = responses[0][0][1] if responses and responses[0] else None
        if current is not None and current.lease == lease and _decode(current.value, key) == my_id:
            self._leader_keys[key] = my_id
            return True
        self._leader_keys.pop(key, None)
        return False

    async def leader(self, leader_key: str) -> str | None:
        """The current leader's id, or None."""
        return await self.get(leader_key)

    async def resign(self, leader_key: str | None = None) -> None:
        """Give up leadership (of one key, or of all this registry holds): delete the key if still ours."""
        held = list(self._leader_keys.items()) if leader_key is None else \
            [(leader_key, self._leader_keys[leader_key])] if leader_key in self._leader_keys else []
        tx = self._client.transactions
        for key, my_id in held:
            await self._rpc(self._client.transaction(
                compare=[tx.value(key.encode()) == _encode(my_id)],
                success=[tx.delete(key.encode())],
                failure=[],
            ), f"resign {key}")
            self._leader_keys.pop(key, None)
            log.info("etcd_resigned", key=key, id=my_id)

    # ---- closing --------------------------------------------------------------------
    async def close(self) -> None:
        """Stop the keep-alive and revoke the lease, so our keys go at once. Never raises for etcd outages."""
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:
                pass
        if self._lease is not None:
            try:
                await self._rpc(self._client.revoke_lease(self._lease), "lease revoke", min(self.timeout_s, 2.0),
                                closing=True)
            except RegistryError as e:
                log.warning("etcd_revoke_failed", endpoint=self.endpoint, error=str(e),
                            note="keys go when the lease expires")
            self._lease = None
        self._leader_keys.clear()
        await self._close_client()

    async def _close_client(self) -> None:
        try:
            await asyncio.wait_for(self._client.close(), self.timeout_s)
        except Exception:
            pass

    async def __aenter__(self) -> "Registry":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- one place that turns client errors into ours -------------------------------
    async def _renew_client(self, stale: aetcd.Client) -> None:
        """Swap in a fresh client (it signs in again on its first call); close the stale one in the background."""
        if self._new_client is None or self._client is not stale or self._closed:
            return  # another call renewed it already
        self._client = self._new_client()
        log.info("etcd_signing_in_again", endpoint=self.endpoint, note="etcd refused our auth token")
        asyncio.get_running_loop().create_task(self._close_quietly(stale), name="moemesh-etcd-close-stale")

    async def _close_quietly(self, client: aetcd.Client) -> None:
        try:
            await asyncio.wait_for(client.close(), self.timeout_s)
        except Exception:
            pass

    async def _rpc(self, coro, what: str, timeout_s: float | None = None, closing: bool = False):
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        client = self._client  # the one the call was made on (the coroutine was built just now)
        if self._closed and not closing:
            coro.close()
            raise RegistryError(f"Registry for etcd at {self.endpoint} is closed ({what})")
        try:
            return await asyncio.wait_for(coro, timeout_s)
        except asyncio.TimeoutError as e:
            raise RegistryUnavailable(f"etcd at {self.endpoint} did not answer {what} within {timeout_s:g} s; "
                                      "is etcd running (moemesh up starts one)?") from e
        except (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError) as e:
            raise RegistryUnavailable(f"etcd at {self.endpoint} is unreachable ({what}): {e}") from e
        except aetcd.ClientError as e:
            if _token_refused(e):
                await self._renew_client(client)
                raise RegistryUnavailable(f"etcd at {self.endpoint} refused our auth token ({what}); "
                                          "signing in again") from e
            raise RegistryError(f"etcd at {self.endpoint} refused {what}: {e}{_refusal_hint(e)}") from e
