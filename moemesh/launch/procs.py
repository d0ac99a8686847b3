"""Starting role processes on this machine (the launcher side of ``bench --mesh`` and ``up``).

Every role prints one JSON line ``{"event": "ready", "port": P, ...}`` on stdout once it
serves; logs go to stderr (here: a file per process).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from moemesh.launch.parent_watch import child_env


@dataclass
class RoleProcess:
    name: str
    proc: subprocess.Popen
    ready: dict = field(default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.ready["port"])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        terminate(self.proc, timeout_s)


def terminate(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM (a role drains and leaves the mesh), then SIGKILL if it is not gone within ``timeout_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Kept for bench --mesh: an expert node and the spec it was started with.
@dataclass
class NodeProcess(RoleProcess):
    spec: str = ""


def spawn(name: str, args: list[str], log_dir: str | Path | None = None, threads: int | None = None) -> subprocess.Popen:
    """Start ``python -m moemesh.cli ARGS``; stderr to LOG_DIR/NAME.log (or nowhere).

    The child ends when this process does, even killed by SIGKILL (``moemesh/launch/parent_watch.py``).
    """
    env = child_env(dict(os.environ))
    if threads is not None:
        # Processes sharing one machine: one OpenMP pool each or they stall each other (see bench --mesh).
        env["OMP_NUM_THREADS"] = str(threads)
    stderr = (Path(log_dir) / f"{name}.log").open("w") if log_dir else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "moemesh.cli", *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, start_new_session=True)
    finally:
        if stderr is not subprocess.DEVNULL:
            stderr.close()  # the child holds its own copy


def wait_ready(proc: subprocess.Popen, deadline: float, name: str = "process") -> dict:
    """Read stdout until the ready line; select first so a wedged child cannot block past the deadline."""
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{name} exited with code {proc.wait()} before it was ready")
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "ready":
            return event
    raise TimeoutError(f"{name} was not ready in time")


def stop_all(procs: list[RoleProcess], timeout_s: float = 20.0) -> None:
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()


def spawn_expert_nodes(model_dir: str | Path, specs: list[str], timeout_s: float = 120.0,
                       log_dir: str | Path | None = None, extra_args: list[str] = ()) -> list[NodeProcess]:
    """Start one fixed-shard expert node per spec on free loopback ports; return once every node serves."""
    procs = [spawn(f"expert-{i}", ["expert-node", "--model", str(model_dir), "--experts", spec, "--port", "0",
                                   *extra_args],
                   log_dir, threads=int(os.environ.get("MOEMESH_NODE_THREADS", "1")))
             for i, spec in enumerate(specs)]
    nodes = []
    deadline = time.monotonic() + timeout_s
    try:
        for i, (proc, spec) in enumerate(zip(procs, specs)):
            nodes.append(NodeProcess(f"expert-{i}", proc, wait_ready(proc, deadline, f"expert node {i}"), spec))
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
        raise
    return nodes
