"""Starting role processes on this machine (the launcher side of ``bench --mesh`` and ``up``)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class NodeProcess:
    proc: subprocess.Popen
    port: int
    spec: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn_expert_nodes(model_dir: str | Path, specs: list[str], timeout_s: float = 120.0,
                       log_dir: str | Path | None = None) -> list[NodeProcess]:
    """Start one expert node per spec on free loopback ports; return once every node is serving."""
    procs = []
    for i, spec in enumerate(specs):
        stderr = (Path(log_dir) / f"expert-{i}.log").open("w") if log_dir else subprocess.DEVNULL
        cmd = [sys.executable, "-m", "moemesh.cli", "expert-node", "--model", str(model_dir), "--experts", spec,
               "--port", "0"]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("MOEMESH_NODE_THREADS", "1"))
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env))
        if stderr is not subprocess.DEVNULL:
            stderr.close()  # the child holds its own copy
    nodes = []
    deadline = time.monotonic() + timeout_s
    try:
        for proc, spec in zip(procs, specs):
            nodes.append(NodeProcess(proc, _ready_port(proc, deadline), spec))
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
        raise
    return nodes


def _ready_port(proc: subprocess.Popen, deadline: float) -> int:
    """Read the node's stdout until its {"event": "ready", "port": P} line."""
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        # select before readline, so a node that wedges while loading cannot block us past the deadline
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"expert node exited with code {proc.wait()} before it was ready")
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "ready":
            return int(event["port"])
    raise TimeoutError("expert node was not ready in time")
