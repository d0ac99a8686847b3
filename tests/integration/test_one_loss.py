"""One expert-node loss survived by default (issue 14, point 4), through `moemesh up` with real processes.

With default slots on 2 expert nodes every expert is on both, so SIGKILL of one under 16 concurrent streams
loses no request and changes no token (greedy); `moemesh status` says whether the live placement survives one
more loss. With fewer slots (`--expert-slots`), `moemesh up` and `moemesh status` say plainly that it does not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import DEADLINE_S

from .test_elastic import Mesh, Streams, _experts, _settled, model, reference  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def _status_text(mesh: Mesh) -> str:
    out = subprocess.run([sys.executable, "-m", "moemesh.cli", "status", "--router", mesh.ready["router"]],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _loss_line(text: str) -> str:
    return next(line.strip() for line in text.splitlines() if "one expert-node loss:" in line)


def _events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_defaults_survive_sigkill_of_one_of_two_expert_nodes(model, reference, tmp_path):
    mesh = Mesh(model, tmp_path, "--expert-nodes", "2", "--rebalance-interval", "0")
    streams = None
    try:
        assert mesh.ready["expert_slots"] == 8 and mesh.ready["expert_node_loss"] == "survivable"
        status = mesh.wait_status(_settled, DEADLINE_S, "the first placement")
        held = {name: sum(len(le["experts"]) for le in node["experts"]) for name, node in _experts(status).items()}
        assert held == {"expert-0": 16, "expert-1": 16}  # 2 MoE layers x 8 experts, each on both nodes
        assert _loss_line(_status_text(mesh)) == "one expert-node loss: survivable"
        streams = Streams(mesh.client, reference)
        streams.wait_completed(16)
        victim = mesh.processes()["expert-1"]
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.time()
        done = streams.completed
        streams.wait_completed(done + 32)  # every one of them with the fault-free tokens
        status = mesh.wait_status(lambda s: _settled(s) and all(
            n["id"] != "expert-1" for n in s["nodes"] if n["status"] == "ready"), DEADLINE_S,
            "a placement without expert-1")
        streams.finish()
        attn = _events(tmp_path / "attn-0.log")
        assert not [e for e in attn if e.get("event") == "step_waiting_for_placement"], \
            "every expert had a replica on the survivor: no step may wait for a re-plan"
        # Each stream gets one chunk per engine step. A stream's first chunk after SIGKILL may come from the step in
        # flight then; its second comes from a step begun after SIGKILL, whose rows only the survivor could compute.
        after = [[t for t in times if t > killed_at] for times in streams.chunk_times]
        first_chunk = min(ts[0] for ts in after if ts)
        first_step = min(ts[1] for ts in after if len(ts) > 1)
        print(f"SIGKILL -> first chunk {first_chunk - killed_at:.3f} s; -> first step begun after SIGKILL completed "
              f"(on the survivor alone) {first_step - killed_at:.3f} s")
        # one survivor: any further loss stops service, and status says which experts it would take
        line = _loss_line(_status_text(mesh))
        assert line == "one expert-node loss: NOT survivable (losing expert-0 would lose layers 1-2: experts 0-7)", line
        assert status["placement_reason"].startswith("it names expert nodes that are gone")
    finally:
        if streams is not None:
            streams.stop.set()
        mesh.close()


def test_fewer_slots_than_survivable_are_reported_by_up_and_status(model, reference, tmp_path):
    mesh = Mesh(model, tmp_path, "--expert-nodes", "2", "--expert-slots", "4", "--rebalance-interval", "0")
    try:
        assert mesh.ready["expert_slots"] == 4 and mesh.ready["expert_node_loss"] == "NOT survivable"
        mesh.wait_status(_settled, DEADLINE_S, "the first placement")
        line = _loss_line(_status_text(mesh))
        assert line.startswith("one expert-node loss: NOT survivable (losing expert-0 would lose layer"), line
        assert "losing expert-1 would lose" in line
    finally:
        mesh.close()
    stderr = mesh.proc.stderr.read()
    assert ("moemesh up: warning: --expert-slots 4 on 2 expert nodes (8 experts per MoE layer): one expert-node "
            "loss stops service; surviving it needs >= 8 slots (the default)") in stderr
