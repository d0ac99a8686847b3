"""Per-client fairness through `moemesh up` (real etcd, router, attention and expert node processes).

Two clients, told apart by their bearer tokens (the router's token file holds one per line): one
floods the router with more concurrent streams than its share; the other's request is still served.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import threading
from collections import Counter

import pytest

from moemesh.launch.procs import terminate
from moemesh.router import MeshClient, MeshError
from tests.helpers import eventually

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

FLOOD_STREAMS = 8  # concurrent streams of the flooder: over its 2 running + 1 queued
WAIT_S = 120.0  # polling bound on a loaded 2-core box (not a latency assertion)


class Flooder:
    """``FLOOD_STREAMS`` threads, each generating again and again until ``stop``; counts the outcomes."""

    def __init__(self, client: MeshClient):
        self.client, self.outcomes, self.refusals = client, Counter(), []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(FLOOD_STREAMS)]

    def _loop(self, i: int) -> None:
        while not self._stop.is_set():
            try:
                self.client.generate(prompt_ids=[3, 4 + i], max_tokens=32, ignore_eos=True, temperature=0.0)
                outcome = "ok"
            except MeshError as exc:
                outcome = exc.status
                if exc.status == "RESOURCE_EXHAUSTED":
                    with self._lock:
                        self.refusals.append(exc.details)
            with self._lock:
                self.outcomes[outcome] += 1

    def count(self, outcome: str) -> int:
        with self._lock:
            return self.outcomes[outcome]

    def start(self) -> "Flooder":
        for t in self.threads:
            t.start()
        return self

    def flooding(self) -> bool:
        return not self._stop.is_set() and all(t.is_alive() for t in self.threads)

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(60)


def test_a_flooding_client_does_not_lock_out_another(tmp_path):
    (tmp_path / "tokens").write_text("# one token per client\ntoken-flooder\ntoken-polite\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moemesh.cli", "up", "--port", "0", "--log-dir", str(tmp_path / "logs"),
         "--auth-token-file", str(tmp_path / "tokens"), "--max-running-per-client", "2",
         "--max-queued-per-client", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready_fds, _, _ = select.select([proc.stdout], [], [], 180)
        assert ready_fds, "moemesh up was not ready within 180 s"
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        router = json.loads(line)["router"]
        with MeshClient(router, token="token-flooder", retries=0, timeout_s=WAIT_S) as noisy, \
                MeshClient(router, token="token-polite", retries=0, timeout_s=WAIT_S) as polite:
            flood = Flooder(noisy).start()
            try:
                eventually(lambda: flood.count("RESOURCE_EXHAUSTED") >= 1, WAIT_S, "the flooder is refused")
                refused_before = flood.count("RESOURCE_EXHAUSTED")
                result = polite.generate(prompt_ids=[5, 9, 33], max_tokens=6, ignore_eos=True, temperature=0.0)
                assert len(result.token_ids) == 6
                assert flood.flooding()
                # it went on being refused after the polite client was served: it was flooding all along
                eventually(lambda: flood.count("RESOURCE_EXHAUSTED") > refused_before, WAIT_S,
                           "the flooder is still refused")
                assert flood.count("ok") >= 0 and set(flood.outcomes) <= {"ok", "RESOURCE_EXHAUSTED"}
                assert "--max-queued-per-client 1" in flood.refusals[0]
                assert "--max-running-per-client 2" in flood.refusals[0]
            finally:
                flood.stop()
            # the flooder's share came back: its next request is served
            assert len(noisy.generate(prompt_ids=[3, 4], max_tokens=2, temperature=0.0).token_ids) == 2
    finally:
        terminate(proc, 60)
