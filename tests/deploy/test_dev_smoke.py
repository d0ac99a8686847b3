"""The dev overlay's containers, run on loopback with their exact args and environment, serve a request.

Substituted, and nothing else: the etcd endpoint (a local EtcdServer), the ports (free ones), the model
volume (/models -> a temp dir, filled by running the overlay's own initContainer command), /tmp (HOME)
-> a temp dir, the downward API (POD_NAME = the StatefulSet/Deployment pod name, POD_NAMESPACE), and
--advertise-host (the pod's DNS name -> 127.0.0.1). One router replica stands for the Deployment.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moemesh.launch.etcd_server import EtcdServer, free_port

from .manifests import container_env, containers, docs, moemesh_argv, render_overlay

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

READY_S = 150.0


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log = (log_dir / f"{name}.log").open("wb")
        self.popen = subprocess.Popen([sys.executable, "-m", "moemesh.cli", *argv], env=env, text=True,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log)
        self.lines: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.ready: dict | None = None

    def _pump(self):
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_ready(self, deadline: float) -> dict:
        while self.ready is None:
            try:
                line = self.lines.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready (rc={self.popen.poll()}):\n{self.tail()}")
            try:
                event = json.loads(line) if line else None
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "ready":
                self.ready = event
        return self.ready

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]


def _dev_pods(objs: list[dict], namespace: str):
    """(pod name, container, is_init) in start order: init containers first, then experts, attention, router."""
    order = {"expert": 0, "attn": 1, "router": 2}
    pods = []
    for obj, c, init in containers(objs):
        role = obj["spec"]["template"]["metadata"]["labels"]["moemesh.io/role"]
        if role not in order:
            continue
        replicas = obj["spec"].get("replicas", 1) if role != "router" else 1
        for i in range(replicas):
            pod = f"{obj['metadata']['name']}-{i}" if obj["kind"] == "StatefulSet" else f"{obj['metadata']['name']}-abc12"
            pods.append((0 if init else 1 + order[role], pod, c, init))
    return [(pod, c, init) for _, pod, c, init in sorted(pods, key=lambda p: p[0])]


def test_dev_overlay_serves_a_request(tmp_path):
    from moemesh.router import MeshClient

    objs = docs(render_overlay("dev"))
    namespace = next(o["metadata"]["name"] for o in objs if o["kind"] == "Namespace")
    models, home = tmp_path / "models", tmp_path / "tmp"
    models.mkdir()
    home.mkdir()
    procs: list[Proc] = []
    with EtcdServer() as etcd:
        try:
            initialized = set()
            for pod, c, init in _dev_pods(objs, namespace):
                env = container_env(c, objs, {"POD_NAME": pod, "POD_NAMESPACE": namespace, "POD_IP": "127.0.0.1"})
                env.update({"MOEMESH_ETCD": etcd.endpoint, "MOEMESH_ROUTER_PORT": str(free_port()),
                            "MOEMESH_ATTN_PORT": str(free_port()), "MOEMESH_EXPERT_PORT": str(free_port()),
                            "MOEMESH_METRICS_PORT": str(free_port()), "MOEMESH_HEALTH_PORT": str(free_port())})
                argv = moemesh_argv(c, env)
                assert argv is not None, f"{pod}/{c['name']} does not run the moemesh entrypoint"
                assert not any(a.startswith("--tls") for a in argv), "dev has no TLS"
                argv = [a.replace("/models", str(models)) if "/models" in a else a for a in argv]
                argv = ["--advertise-host=127.0.0.1" if a.startswith("--advertise-host") else a for a in argv]
                env = {k: v.replace("/models", str(models)).replace("/tmp", str(home)) for k, v in env.items()}
                full_env = {**os.environ, **env, "OMP_NUM_THREADS": "1"}
                if init:
                    # The initContainer: every pod writes the same checkpoint (fixed seed); once is enough here.
                    if tuple(argv) not in initialized:
                        subprocess.run([sys.executable, "-m", "moemesh.cli", *argv], env=full_env, check=True,
                                       timeout=120, capture_output=True)
                        initialized.add(tuple(argv))
                    continue
                procs.append(Proc(pod, argv, full_env, tmp_path))
            assert {p.name.rsplit("-", 1)[0] for p in procs} >= {"moemesh-expert", "moemesh-attn"}
            deadline = time.monotonic() + READY_S
            ready = {p.name: p.wait_ready(deadline) for p in procs}
            router = next(p for p in procs if p.name.startswith("moemesh-router"))
            address = f"127.0.0.1:{ready[router.name]['port']}"
            last = None
            while time.monotonic() < deadline:
                try:
                    with MeshClient(address) as client:
                        result = client.generate(prompt="The river", max_tokens=4, temperature=0)
                    break
                except Exception as exc:  # attention node not ready yet: the router says UNAVAILABLE
                    last = exc
                    time.sleep(1.0)
            else:
                logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)
                raise AssertionError(f"no answer through the router: {last}\n{logs}")
            assert len(result.token_ids) == 4, result
            for p in procs:
                p.popen.send_signal(signal.SIGTERM)
            for p in procs:
                assert p.popen.wait(timeout=60) == 0, f"{p.name} did not drain cleanly:\n{p.tail()}"
        finally:
            for p in procs:
                if p.popen.poll() is None:
                    p.popen.kill()
                    p.popen.wait(timeout=10)
                p.log.close()
