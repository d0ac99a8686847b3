"""Failure domains end to end (issue 18, point 2): `moemesh up --expert-zones a,b` gives expert nodes zones
round-robin, the leader spreads each expert's replicas over both, `moemesh status` shows them, and SIGKILL of
every node of one zone under 16 concurrent streams loses no request and changes no token (greedy). With too few
slots, `moemesh up` and `moemesh status` (the router's zone_warnings) say that a zone's loss is not survived.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.helpers import DEADLINE_S

from .test_elastic import Mesh, Streams, _experts, _settled, model, reference  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def _status(mesh: Mesh, *extra: str) -> str:
    out = subprocess.run([sys.executable, "-m", "moemesh.cli", "status", "--router", mesh.ready["router"], *extra],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _line(text: str, start: str) -> str:
    return next(line.strip() for line in text.splitlines() if line.strip().startswith(start))


def _spans_zones(status: dict) -> bool:
    """Settled, and every expert of every layer is hosted in both zones (what the leader aims for)."""
    zones: dict[tuple[int, int], set[str]] = {}
    for node in _experts(status).values():
        for le in node["experts"]:
            for e in le["experts"]:
                zones.setdefault((le["layer"], e), set()).add(node["zone"])
    return _settled(status) and len(zones) == 16 and all(z == {"a", "b"} for z in zones.values())


def test_losing_a_zone_leaves_every_expert_served(model, reference, tmp_path):
    mesh = Mesh(model, tmp_path, "--expert-nodes", "4", "--expert-zones", "a,b", "--rebalance-interval", "0")
    streams = None
    try:
        assert mesh.ready["expert_zones"] == {"expert-0": "a", "expert-1": "b", "expert-2": "a", "expert-3": "b"}
        assert mesh.ready["zone_loss"] == "survivable" and mesh.ready["expert_slots"] == 5
        status = mesh.wait_status(_spans_zones, DEADLINE_S, "a placement spanning both zones")
        assert {n: e["zone"] for n, e in _experts(status).items()} == mesh.ready["expert_zones"]
        assert status["zone_warnings"] == []
        text = _status(mesh)
        assert _line(text, "one zone loss:") == "one zone loss: survivable (zone a, zone b)", text
        assert " zone a, " in _line(text, "expert expert-0") and " zone b, " in _line(text, "expert expert-3")
        as_json = json.loads(_status(mesh, "--json"))
        assert as_json["zone_loss"] == "survivable (zone a, zone b)" and as_json["zone_warnings"] == []

        streams = Streams(mesh.client, reference)
        streams.wait_completed(16)
        for name in ("expert-0", "expert-2"):  # all of zone a
            os.kill(mesh.processes()[name].pid, signal.SIGKILL)
        done = streams.completed
        streams.wait_completed(done + 32)  # every one with the fault-free tokens
        status = mesh.wait_status(lambda s: _settled(s) and sorted(
            n["id"] for n in _experts(s).values() if n["status"] == "ready") == ["expert-1", "expert-3"],
            DEADLINE_S, "a placement on zone b alone")
        streams.finish()
        assert status["mesh_state"] == "serving" and status["missing_experts"] == []
        attn = [json.loads(line) for line in (tmp_path / "attn-0.log").read_text().splitlines()
                if line.startswith("{")]
        assert not [e for e in attn if e.get("event") == "step_waiting_for_placement"], \
            "every expert had a replica in zone b: no step may wait for a re-plan"
        text = _status(mesh)
        assert _line(text, "one zone loss:") == "one zone loss: NOT survivable (every serving expert node is in " \
                                                "zone b)", text
    finally:
        if streams is not None:
            streams.stop.set()
        mesh.close()


def test_too_few_slots_for_a_zone_loss_is_said(model, tmp_path):
    # 2 nodes x 4 slots for 8 experts per layer: one replica each, so each zone alone holds some experts
    mesh = Mesh(model, tmp_path, "--expert-nodes", "2", "--expert-zones", "a,b", "--expert-slots", "4",
                "--rebalance-interval", "0")
    try:
        assert mesh.ready["zone_loss"] == "NOT survivable"
        status = mesh.wait_status(lambda s: _settled(s) and len(s["zone_warnings"]) == 2, DEADLINE_S,
                                  "the router's zone warnings")
        for zone, warning in zip("ab", sorted(status["zone_warnings"])):
            assert warning.startswith(f"losing zone {zone} would leave experts unhosted (layers 1-2: experts "), warning
            assert warning.endswith("the nodes outside it have 4 slots per layer for 8 experts; add slots or nodes in "
                                    "other zones"), warning
        text = _status(mesh)
        assert _line(text, "one zone loss:").startswith("one zone loss: NOT survivable (losing zone a would lose "
                                                        "layers 1-2: experts "), text
        assert sum(line.strip().startswith("warning: losing zone") for line in text.splitlines()) == 2, text
    finally:
        mesh.close()
