"""The processes of a ``moemesh up`` mesh, and the MeshControl gRPC service that adds and removes expert nodes.

``ProcessMesh`` owns the process table (thread-safe: the control service's threads and ``up``'s main loop
share it). Expert and attention nodes may come and go (removed, or killed from outside) without stopping
the mesh: the router re-plans around them. Only the router's exit stops ``up``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2

from moemesh.errors import DeadlineExceededError, InvalidRequestError, NotFoundError
from moemesh.logs import get_logger
from moemesh.text import shorten
from moemesh.wire.authz import Authenticator
from moemesh.wire.server import create_server
from moemesh.wire.tls import TLSFiles
from moemesh.launch.procs import RoleProcess, spawn, wait_ready
from moemesh.v1 import control_pb2, control_pb2_grpc

log = get_logger("moemesh.cli.up")

CONTROL_SERVICE = control_pb2.DESCRIPTOR.services_by_name["MeshControl"].full_name
# Expert nodes a mesh runs at most unless `moemesh up --max-expert-nodes` says otherwise: each is a process
# holding model weights, and MeshControl must not let one call fill the machine.
DEFAULT_MAX_EXPERT_NODES = 8


@dataclass
class MeshProcess(RoleProcess):
    role: str = ""
    draining: bool = False
    ready_event: threading.Event = field(default_factory=threading.Event)

    @property
    def state(self) -> str:
        if self.proc.poll() is not None:
            return "exited"
        if self.draining:
            return "draining"
        return "running" if self.ready else "starting"


class ProcessMesh:
    """The role processes of one local mesh. ``expert_args(name)`` builds an expert node's command line."""

    def __init__(self, log_dir: Path, expert_args: Callable[[str], list[str]], threads: int = 1,
                 max_experts: int = DEFAULT_MAX_EXPERT_NODES):
        self.log_dir, self.expert_args, self.threads = log_dir, expert_args, threads
        self.max_experts = max_experts  # expert node processes alive at once, at most
        self.procs: list[MeshProcess] = []
        self._lock = threading.Lock()
        self._adding = threading.Lock()  # one add at a time: the room it checks is still there when it starts
        self._next_expert = 0

    def start(self, name: str, role: str, args: list[str]) -> MeshProcess:
        p = MeshProcess(name, spawn(name, args, self.log_dir, self.threads), role=role)
        with self._lock:
            self.procs.append(p)
        return p

    def wait_all_ready(self, deadline: float) -> None:
        for p in list(self.procs):
            if not p.ready:
                p.ready = wait_ready(p.proc, deadline, p.name)
                p.ready_event.set()

    def add_experts(self, count: int, deadline: float | None = None, watch: bool = True) -> list[MeshProcess]:
        """Start ``count`` expert nodes named expert-0, expert-1, ... (never reused). With ``watch``, a thread
        marks each ready when it says so; with ``deadline``, wait for that until then.

        InvalidRequestError unless 1 <= count <= the room left under ``max_experts`` (live ones count, draining
        ones until they exit)."""
        with self._adding:
            added = self._start_experts(count, watch)
        if deadline is not None:
            for p in added:
                p.ready_event.wait(max(0.0, deadline - time.monotonic()))
        return added

    def _start_experts(self, count: int, watch: bool) -> list[MeshProcess]:
        live = sum(1 for p in self.snapshot() if p.role == "expert" and p.proc.poll() is None)
        room = max(0, self.max_experts - live)
        if not 1 <= count <= room:
            raise InvalidRequestError(f"count must be 1..{room}, got {count}: this mesh runs at most "
                                      f"{self.max_experts} expert nodes (moemesh up --max-expert-nodes) and "
                                      f"{live} are running")
        added = []
        for _ in range(count):
            with self._lock:
                name = f"expert-{self._next_expert}"
                self._next_expert += 1
            p = self.start(name, "expert", self.expert_args(name))
            if watch:
                threading.Thread(target=self._await_ready, args=(p,), name=f"ready-{name}", daemon=True).start()
            added.append(p)
            log.info("expert_node_started", name=name, pid=p.proc.pid)
        return added

    def _await_ready(self, p: MeshProcess) -> None:
        try:
            p.ready = wait_ready(p.proc, time.monotonic() + 600, p.name)
        except (RuntimeError, TimeoutError) as exc:
            log.warning("expert_node_not_ready", name=p.name, error=str(exc))
        p.ready_event.set()

    def remove_expert(self, name: str) -> MeshProcess:
        """SIGTERM one expert node: it drains (the leader plans it away) and exits. KeyError if unknown."""
        with self._lock:
            matches = [p for p in self.procs if p.name == name and p.role == "expert"]
        if not matches:
            raise KeyError(name)
        p = matches[0]
        if p.proc.poll() is None and not p.draining:
            p.draining = True
            p.proc.terminate()
            log.info("expert_node_draining", name=name, pid=p.proc.pid)
        return p

    def snapshot(self) -> list[MeshProcess]:
        with self._lock:
            return list(self.procs)


class MeshControlService(control_pb2_grpc.MeshControlServicer):
    def __init__(self, mesh: ProcessMesh):
        self.mesh = mesh

    def _list(self, procs: list[MeshProcess]) -> control_pb2.ListProcessesResponse:
        out = control_pb2.ListProcessesResponse()
        for p in procs:
            code = p.proc.poll()
            out.processes.add(name=p.name, role=p.role, pid=p.proc.pid, port=int(p.ready.get("port", 0) or 0),
                              state=p.state, exit_code=code or 0)
        return out

    def ListProcesses(self, request, context):
        return self._list(self.mesh.snapshot())

    def AddExpertNodes(self, request, context):
        remaining = context.time_remaining()
        deadline = time.monotonic() + (remaining if remaining is not None else 600.0) if request.wait_ready else None
        added = self.mesh.add_experts(request.count, deadline)
        if request.wait_ready and not all(p.ready for p in added):
            raise DeadlineExceededError(f"{', '.join(p.name for p in added if not p.ready)} not ready yet; they keep "
                                        "starting (see ListProcesses)")
        return self._list(added)

    def RemoveExpertNode(self, request, context):
        try:
            p = self.mesh.remove_expert(request.name)
        except KeyError:
            names = [p.name for p in self.mesh.snapshot() if p.role == "expert"]
            raise NotFoundError(
                f"no expert node named {shorten(request.name)!r}; expert nodes: {', '.join(names) or 'none'}"
            ) from None
        if request.wait_exit:
            remaining = context.time_remaining()
            try:
                p.proc.wait(remaining if remaining is not None else None)
            except Exception:
                raise DeadlineExceededError(f"{p.name} is still draining") from None
        return self._list([p])


def serve_control(mesh: ProcessMesh, host: str = "127.0.0.1", port: int = 0, *, tls: TLSFiles | None = None,
                  auth: Authenticator | None = None) -> tuple[grpc.Server, int]:
    """The MeshControl service (with health and reflection) on a thread-pool server, started; returns (server, port).

    With ``tls`` (and its CA) the port is mTLS and only the operator's certificate may call MeshControl;
    ``auth`` adds tokens (:mod:`moemesh.wire.authz`). Its methods raise domain errors; the server's
    status interceptor turns them into status codes.
    """
    server, bound, health_servicer = create_server(
        "control", lambda server: control_pb2_grpc.add_MeshControlServicer_to_server(MeshControlService(mesh), server),
        (CONTROL_SERVICE,), host, port, tls=tls, aio=False, max_workers=4, auth=auth)
    server.start()
    for name in ("", CONTROL_SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
