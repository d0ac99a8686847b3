"""A launcher killed with SIGKILL takes its role processes with it (moemesh/launch/parent_watch.py).

Seen before the fix: ``moemesh up`` meshes outlived a killed parent (children run in their own session, so
nothing else reaches them); without the watch this test times out waiting for the node to exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LAUNCHER = """
import json, signal, sys
from moemesh.launch.procs import spawn_expert_nodes
nodes = spawn_expert_nodes(sys.argv[1], ["0-3"])
print(json.dumps({"pid": nodes[0].proc.pid}), flush=True)
signal.pause()  # until the test kills it
"""

ETCD_LAUNCHER = """
import json, signal
from moemesh.launch.etcd_server import EtcdServer
etcd = EtcdServer(exit_with_parent=True).start()  # what moemesh up starts
print(json.dumps({"pid": etcd.proc.pid}), flush=True)
signal.pause()
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its reaper is missing


def _launch(model: Path | None, env: dict[str, str], script: str = LAUNCHER) -> tuple[subprocess.Popen, int]:
    launcher = subprocess.Popen([sys.executable, "-c", script, *([str(model)] if model else [])], stdout=subprocess.PIPE, text=True,
                                env=env, cwd=Path(__file__).parents[2])
    line = launcher.stdout.readline()
    assert line, f"launcher exited with {launcher.wait()} before its node was ready"
    return launcher, json.loads(line)["pid"]


def _kill(launcher: subprocess.Popen) -> None:
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()


def test_child_ends_when_launcher_is_killed(tiny_checkpoint):
    model = tiny_checkpoint(hidden_size=32, layers=2, experts=4, experts_per_token=2)
    launcher, child = _launch(model, dict(os.environ))
    try:
        assert _alive(child)
        _kill(launcher)
        eventually(lambda: not _alive(child), what=f"expert node {child} to exit after its launcher died")
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)



def test_embedded_etcd_ends_when_launcher_is_killed():
    launcher, etcd = _launch(None, dict(os.environ), ETCD_LAUNCHER)
    try:
        assert _alive(etcd) and "etcd" in Path(f"/proc/{etcd}/cmdline").read_text()
        _kill(launcher)
        eventually(lambda: not _alive(etcd), what=f"etcd {etcd} to exit after its launcher died")
    finally:
        if _alive(etcd):
            os.kill(etcd, signal.SIGKILL)
