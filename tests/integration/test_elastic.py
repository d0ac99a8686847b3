"""Elastic expert pools end to end, through `moemesh up`: real etcd, router, attention and expert node processes.

Load-driven rebalancing, scaling 2 -> 3 -> 2 expert nodes and SIGKILLed expert nodes (with and without
replicas of their experts), all while clients stream: every request must complete with exactly the tokens
of a fault-free single-process run.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from moemesh.sampling import SamplingParams
from moemesh.launch.embedded import build_local
from moemesh.router import MeshClient, MeshError
from moemesh.model.tiny import write_tiny_checkpoint
from tests.helpers import DEADLINE_S, eventually
from moemesh.v1 import control_pb2, control_pb2_grpc, dispatch_pb2, dispatch_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

MAX_TOKENS = 24
PROMPTS = [[3 + i, 40 + 7 * i, 11, 90 - i, 5 * i + 1] for i in range(16)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("elastic") / "m", arch="deepseek_v3", hidden_size=64,
                                 layers=3, experts=8, experts_per_token=2)


@pytest.fixture(scope="module")
def reference(model):
    """Fault-free greedy tokens of every prompt, from the single-process engine."""
    engine = build_local(model, progress=False).engine
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return {tuple(p): out.token_ids for p, out in zip(PROMPTS, engine.generate(PROMPTS, params))}


class Mesh:
    """A running `moemesh up` and handles on its router and MeshControl service."""

    def __init__(self, model, log_dir: Path, *flags: str):
        self.log_dir = log_dir
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moemesh.cli", "up", "--model", str(model), "--port", "0", "--log-dir",
             str(log_dir), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        ready, _, _ = select.select([self.proc.stdout], [], [], 180)
        assert ready, "moemesh up was not ready within 180 s"
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()[-3000:]
        self.ready = json.loads(line)
        self.client = MeshClient(self.ready["router"], timeout_s=120)
        self._channel = grpc.insecure_channel(self.ready["control"])
        self.control = control_pb2_grpc.MeshControlStub(self._channel)

    def processes(self) -> dict[str, control_pb2.Process]:
        reply = self.control.ListProcesses(control_pb2.ListProcessesRequest(), timeout=10)
        return {p.name: p for p in reply.processes}

    def status(self) -> dict:
        return self.client.cluster_status()

    def expert_info(self, name: str) -> dispatch_pb2.InfoResponse:
        port = self.processes()[name].port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return dispatch_pb2_grpc.ExpertDispatchStub(channel).Info(dispatch_pb2.InfoRequest(), timeout=10)

    def wait_status(self, predicate, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; last status: {json.dumps(status)[:3000]}")

    def wait_stable(self, quiet_s: float, timeout_s: float, what: str) -> dict:
        """A settled status whose placement version has not changed for ``quiet_s`` (re-plans have stopped)."""
        state = {"version": None, "since": time.monotonic()}

        def stable(status: dict) -> bool:
            if not _settled(status) or status["placement_version"] != state["version"]:
                state["version"], state["since"] = status["placement_version"], time.monotonic()
                return False
            return time.monotonic() - state["since"] >= quiet_s

        return self.wait_status(stable, timeout_s, what)

    def close(self) -> None:
        self.client.close()
        self._channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _experts(status: dict) -> dict[str, dict]:
    return {n["id"]: n for n in status["nodes"] if n["role"] == "expert"}


def _settled(status: dict, version: int | None = None) -> bool:
    """Every node serves the current placement version (and it is newer than ``version``)."""
    v = int(status["placement_version"])
    live = [n for n in status["nodes"] if n["status"] == "ready"]
    return (version is None or v > version) and live and all(int(n["placement_version"]) == v for n in live)


class Streams:
    """Client threads that keep streaming the PROMPTS and check every result against the reference."""

    def __init__(self, client: MeshClient, reference: dict, threads: int = 16):
        self.client, self.reference = client, reference
        self.stop = threading.Event()
        self.completed = 0
        self.errors: list[str] = []
        self.token_times: list[float] = []  # arrival time of every streamed chunk (monotonic)
        self.chunk_times: list[list[float]] = [[] for _ in range(threads)]  # per thread, each chunk's wall clock
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            prompt = PROMPTS[(i + n) % len(PROMPTS)]
            n += 1
            tokens = []
            try:
                for chunk in self.client.stream(prompt_ids=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                                ignore_eos=True):
                    tokens += chunk.token_ids
                    self.chunk_times[i].append(time.time())
                    with self._lock:
                        self.token_times.append(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                with self._lock:
                    self.errors.append(f"{prompt}: {exc}")
                continue
            with self._lock:
                if tokens != self.reference[tuple(prompt)]:
                    self.errors.append(f"{prompt}: got {tokens}, want {self.reference[tuple(prompt)]}")
                self.completed += 1

    def wait_completed(self, count: int, timeout_s: float = 120) -> None:
        eventually(lambda: self.completed >= count or self.errors, timeout_s, f"{count} completed requests")
        assert not self.errors, self.errors[:3]
        assert self.completed >= count, f"only {self.completed} of {count} requests completed"

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(180)
        assert not self.errors, self.errors[:3]


def test_rebalance_follows_the_measured_skew_and_nodes_compute_the_planned_shares(model, reference, tmp_path):
    mesh = Mesh(model, tmp_path, "--expert-nodes", "2", "--expert-slots", "6", "--rebalance-interval", "2")
    try:
        first = mesh.wait_status(_settled, DEADLINE_S, "the first placement")
        assert first["window_tokens"] == 0 and "no placement" in first["placement_reason"]
        skewed = [PROMPTS[0]] * 8  # one prompt over and over: a few experts carry most tokens
        for prompt in skewed:
            assert mesh.client.generate(prompt_ids=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                        ignore_eos=True).token_ids == reference[tuple(prompt)]
        rebalanced = mesh.wait_status(lambda s: _settled(s, first["placement_version"]) and s["window_tokens"] > 0,
                                      60, "a placement planned on the measured loads")
        assert "periodic rebalance" in rebalanced["placement_reason"]
        # Let the window settle: later re-plans only publish when shares move by > 0.05. Wait for a placement that
        # stays put for 3 rebalance intervals (2 s each) rather than a fixed 5 s guess at how long that takes.
        status = mesh.wait_stable(6.0, DEADLINE_S, "a placement that no re-plan moves")
        before = {name: mesh.expert_info(name).tokens_computed for name in _experts(status)}
        for prompt in skewed:
            assert mesh.client.generate(prompt_ids=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                        ignore_eos=True).token_ids == reference[tuple(prompt)]
        after = mesh.status()
        assert after["placement_version"] == status["placement_version"], "placement changed during the measurement"
        computed = {name: mesh.expert_info(name).tokens_computed - before[name] for name in before}
        total = sum(computed.values())
        for name, node in _experts(after).items():
            measured, planned = computed[name] / total, node["planned_load"]
            print(f"{name}: planned {planned:.3f} computed {measured:.3f}")
            assert abs(measured - planned) < 0.06, (name, measured, planned)
        assert min(b["balancedness"] for b in after["balance"]) > 0.8
    finally:
        mesh.close()


def test_scale_two_three_two_expert_nodes_while_streaming(model, reference, tmp_path):
    mesh = Mesh(model, tmp_path, "--expert-nodes", "2", "--expert-slots", "4", "--rebalance-interval", "0")
    streams = None
    try:
        mesh.wait_status(_settled, DEADLINE_S, "the first placement")
        streams = Streams(mesh.client, reference)
        streams.wait_completed(16)
        joined_at = time.monotonic()
        mesh.control.AddExpertNodes(control_pb2.AddExpertNodesRequest(count=1, wait_ready=True), timeout=120)
        registered_at = time.monotonic()  # the process is up and registered in etcd
        status = mesh.wait_status(lambda s: "expert-2" in _experts(s) and _experts(s)["expert-2"]["planned_load"] > 0
                                  and _settled(s), DEADLINE_S, "expert-2 in the placement")
        deadline = time.monotonic() + 60
        while mesh.expert_info("expert-2").tokens_computed == 0:
            assert time.monotonic() < deadline, "expert-2 never computed a token"
            time.sleep(0.05)
        now = time.monotonic()
        print(f"joining node: serving {registered_at - joined_at:.2f} s after its start, computing routed tokens "
              f"{now - registered_at:.2f} s after that")
        assert "expert nodes joined: expert-2" in status["placement_reason"]
        done = streams.completed
        streams.wait_completed(done + 16)
        reply = mesh.control.RemoveExpertNode(control_pb2.RemoveExpertNodeRequest(name="expert-0", wait_exit=True),
                                              timeout=120)
        assert reply.processes[0].state == "exited" and reply.processes[0].exit_code == 0
        status = mesh.wait_status(lambda s: "expert-0" not in _experts(s) and _settled(s), DEADLINE_S, "expert-0 gone")
        assert sorted(_experts(status)) == ["expert-1", "expert-2"]
        done = streams.completed
        streams.wait_completed(done + 16)
        streams.finish()
        assert "drain_timeout" not in (tmp_path / "expert-0.log").read_text()
        listed = _mesh_cli(mesh, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        states = {p["name"]: p["state"] for p in json.loads(listed.stdout)["processes"]}
        assert states == {"router": "running", "expert-0": "exited", "expert-1": "running", "expert-2": "running",
                          "attn-0": "running"}
        unknown = _mesh_cli(mesh, "remove-expert", "expert-9")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr and "expert-1" in unknown.stderr
    finally:
        if streams is not None:
            streams.stop.set()
        mesh.close()


def _mesh_cli(mesh: Mesh, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moemesh.cli", "mesh", "--control", mesh.ready["control"], *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("replicas, transport", [(True, "grpc"), (False, "grpc"), (False, "torch")],
                         ids=["with-replicas", "without-replicas", "without-replicas-torch"])
def test_sigkilled_expert_node_loses_no_request(model, reference, tmp_path, replicas, transport):
    # 8 slots per node: the survivor can take every expert. With replicas, each expert is on both nodes.
    flags = ["--expert-nodes", "2", "--expert-slots", "8", "--rebalance-interval", "0", "--transport", transport]
    mesh = Mesh(model, tmp_path, *flags, *([] if replicas else ["--no-replicas"]))
    streams = None
    try:
        status = mesh.wait_status(_settled, DEADLINE_S, "the first placement")
        held = {name: sum(len(le["experts"]) for le in node["experts"]) for name, node in _experts(status).items()}
        assert held == ({"expert-0": 16, "expert-1": 16} if replicas else {"expert-0": 8, "expert-1": 8})
        streams = Streams(mesh.client, reference)
        streams.wait_completed(16)
        victim = mesh.processes()["expert-1"]
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.time()
        done = streams.completed
        streams.wait_completed(done + 32)
        status = mesh.wait_status(lambda s: _settled(s) and s["nodes"] and all(
            n["id"] != "expert-1" for n in s["nodes"] if n["status"] == "ready"), DEADLINE_S, "a placement without expert-1")
        streams.finish()
        assert status["placement_reason"].startswith("it names expert nodes that are gone")
        events = [json.loads(line) for line in (tmp_path / "attn-0.log").read_text().splitlines()
                  if line.startswith("{")]
        waited = [e for e in events if e.get("event") == "step_waiting_for_placement"]
        retried = [e for e in events if e.get("event") == "step_retried"]
        if replicas:
            assert not waited, "with replicas, rows must go to the surviving replica within the step"
        else:
            assert waited and retried, "without replicas, a step waits for the re-plan and runs again"
            seconds = datetime.fromisoformat(retried[0]["timestamp"]).timestamp() - killed_at
            print(f"without replicas ({transport}): step re-run on the new placement {seconds:.3f} s after SIGKILL")
    finally:
        if streams is not None:
            streams.stop.set()
        mesh.close()


def test_a_link_broken_by_a_stall_is_redialled_once_the_node_answers_again(model, reference, tmp_path):
    """SIGSTOP past the dispatch deadline: rows go to the replica; after SIGCONT the attention node re-dials the
    same placement by itself (nothing changed in etcd) and the node takes rows again."""
    mesh = Mesh(model, tmp_path, "--expert-nodes", "2", "--expert-slots", "8", "--rebalance-interval", "0",
                "--dispatch-timeout", "1")
    streams = None
    try:
        mesh.wait_status(_settled, DEADLINE_S, "the first placement")
        streams = Streams(mesh.client, reference, threads=4)
        streams.wait_completed(8)
        victim = mesh.processes()["expert-1"]
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            done = streams.completed
            streams.wait_completed(done + 8)  # served by expert-0 alone after the deadline
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        log = tmp_path / "attn-0.log"
        deadline = time.monotonic() + 30
        while "placement_redialled" not in log.read_text():
            assert time.monotonic() < deadline, "the attention node never re-dialled expert-1"
            time.sleep(0.2)
        before = mesh.expert_info("expert-1").tokens_computed
        done = streams.completed
        streams.wait_completed(done + 8)
        assert mesh.expert_info("expert-1").tokens_computed > before, "expert-1 takes no rows after the re-dial"
        streams.finish()
        status = mesh.status()
        assert status["placement_version"] == 1  # nothing was re-planned: the node never looked dead
    finally:
        if streams is not None:
            streams.stop.set()
        mesh.close()


def test_an_unservable_mesh_fails_fast_naming_the_missing_experts_and_resumes_when_a_node_joins(model, reference,
                                                                                                  tmp_path):
    """2 expert nodes, 4 slots each, no replicas: each holds half the experts. SIGKILL one: no placement over the
    survivor can host every expert, so in-flight streams fail once and new requests are answered UNAVAILABLE at
    once (no SDK retries), naming the missing experts and what to do; `moemesh status` says UNSERVABLE. A new
    expert node makes the mesh serve again by itself."""
    mesh = Mesh(model, tmp_path, "--expert-nodes", "2", "--expert-slots", "4", "--no-replicas",
                "--rebalance-interval", "0")
    streams = None
    try:
        status = mesh.wait_status(_settled, DEADLINE_S, "the first placement")
        assert status["mesh_state"] == "serving" and not status["missing_experts"]
        lost = _experts(status)["expert-1"]["experts"]
        assert lost and all(le["experts"] for le in lost)
        streams = Streams(mesh.client, reference, threads=4)
        streams.wait_completed(8)
        os.kill(mesh.processes()["expert-1"].pid, signal.SIGKILL)
        status = mesh.wait_status(lambda s: s["mesh_state"] == "unservable", DEADLINE_S, "an UNSERVABLE mesh")
        streams.stop.set()
        for t in streams._threads:
            t.join(60)
        assert status["missing_experts"] == lost  # exactly what expert-1 held
        problem = status["mesh_problem"]
        assert problem.startswith("the mesh cannot serve: no live expert node hosts layers ") and problem.endswith(
            "add an expert node or raise --expert-slots; the mesh resumes by itself when a node returns")
        # the streams that were running (or started) around the kill: each failed once, with that message
        assert streams.errors and all("UNAVAILABLE: the mesh cannot serve: no live expert node hosts" in e
                                      for e in streams.errors), streams.errors[:3]

        client = MeshClient(mesh.ready["router"], timeout_s=120)  # default retries: it must not use them
        try:
            t0 = time.monotonic()
            with pytest.raises(MeshError) as e:
                client.generate(prompt_ids=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0)
            latency = time.monotonic() - t0
        finally:
            client.close()
        print(f"unservable mesh: a new request answered UNAVAILABLE in {latency * 1000:.0f} ms")
        assert e.value.status == "UNAVAILABLE" and e.value.details == problem
        shown = subprocess.run([sys.executable, "-m", "moemesh.cli", "status", "--router", mesh.ready["router"]],
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and f"mesh UNSERVABLE: {problem}" in shown.stdout, shown.stdout + shown.stderr

        mesh.control.AddExpertNodes(control_pb2.AddExpertNodesRequest(count=1, wait_ready=True), timeout=120)
        status = mesh.wait_status(lambda s: s["mesh_state"] == "serving" and _settled(s), DEADLINE_S,
                                  "the mesh serving again over expert-0 and expert-2")
        assert not status["missing_experts"] and "expert-2" in _experts(status)
        for prompt in PROMPTS[:4]:
            assert mesh.client.generate(prompt_ids=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                        ignore_eos=True).token_ids == reference[tuple(prompt)]
    finally:
        if streams is not None:
            streams.stop.set()
        mesh.close()
