"""Real expert-node processes for integration tests.

``start_expert_node`` launches ``python -m moemesh.cli expert-node`` and waits for
its ``{"event": "ready", "port": P}`` line. ``NodeSet`` launches several at once
(each start imports torch: a few seconds, so they should overlap) and, as a
context manager or from a fixture's teardown, always kills what is left.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.helpers import wait_stopped

READY_TIMEOUT_S = 60.0


class ExpertNodeError(RuntimeError):
    """An expert node died or never said it was ready; the message carries its stderr tail."""


class ExpertProc:
    """One ``moemesh expert-node`` process. Launch with :func:`launch_expert_node`, then :meth:`wait_ready`."""

    def __init__(self, model_dir: str | Path, spec: str, extra_args: Sequence[str] = ()):
        self.model_dir, self.spec = str(model_dir), spec
        self._stderr_file = tempfile.NamedTemporaryFile(prefix="expert-node-", suffix=".log", delete=False)
        self.stderr_path = self._stderr_file.name
        env = dict(os.environ)
        # One intra-op thread: several nodes and the attention side share 2 cores in CI.
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONUNBUFFERED"] = "1"
        self.args = [sys.executable, "-m", "moemesh.cli", "expert-node", "--model", self.model_dir,
                     "--experts", spec, "--port", "0", *extra_args]
        self.popen = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=self._stderr_file, env=env, text=True)
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        threading.Thread(target=self._pump, name=f"expert-node-{self.popen.pid}-stdout", daemon=True).start()
        self.port: int | None = None
        self.stopped = False  # SIGSTOPped and not yet continued

    def _pump(self) -> None:
        """Drain stdout into a queue (so the child never blocks on a full pipe); None at EOF."""
        try:
            for line in self.popen.stdout:
                self._lines.put(line)
        finally:
            self._lines.put(None)

    # ---- readiness ------------------------------------------------------
    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> "ExpertProc":
        deadline = time.monotonic() + timeout_s
        while self.port is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise ExpertNodeError(
                    f"expert node {self.spec!r} not ready after {timeout_s:.0f}s\n{self.stderr_tail()}")
            try:
                line = self._lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the process is gone
                rc = self.popen.wait(timeout=10)
                raise ExpertNodeError(f"expert node {self.spec!r} exited with {rc} before ready\n{self.stderr_tail()}")
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "ready":
                self.port = int(event["port"])
        return self

    @property
    def address(self) -> str:
        assert self.port is not None, "not ready yet"
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr_tail(self, n_chars: int = 4000) -> str:
        try:
            text = Path(self.stderr_path).read_text(errors="replace")
        except OSError:
            return "<no stderr>"
        return text[-n_chars:]

    def log_events(self) -> list[dict]:
        """The node's JSON log lines so far (non-JSON lines skipped)."""
        events = []
        for line in Path(self.stderr_path).read_text(errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                events.append(obj)
        return events

    # ---- lifecycle ------------------------------------------------------
    def alive(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (a stopped process dies too)."""
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM: the node drains and exits 0."""
        self.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGSTOP: the node stops answering but keeps its sockets open (returns once it really is stopped)."""
        self.send_signal(signal.SIGSTOP)
        self.stopped = True
        wait_stopped(self.pid)

    def cont(self) -> None:
        self.send_signal(signal.SIGCONT)
        self.stopped = False

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout=timeout)

    def cleanup(self) -> None:
        """Kill if still running, reap, and remove the stderr log."""
        if self.alive():
            if self.stopped:
                self.cont()
            self.kill()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
            pass
        if self.popen.stdout:
            self.popen.stdout.close()
        self._stderr_file.close()
        try:
            os.unlink(self.stderr_path)
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"ExpertProc(pid={self.pid}, spec={self.spec!r}, port={self.port})"


def launch_expert_node(model_dir: str | Path, spec: str, extra_args: Sequence[str] = ()) -> ExpertProc:
    """Start the process; do not wait for it (call ``wait_ready``)."""
    return ExpertProc(model_dir, spec, extra_args)


def start_expert_node(model_dir: str | Path, spec: str, extra_args: Sequence[str] = (),
                      timeout_s: float = READY_TIMEOUT_S) -> ExpertProc:
    """Start one expert node and wait for its ready line (ExpertNodeError with its stderr tail otherwise)."""
    proc = launch_expert_node(model_dir, spec, extra_args)
    try:
        return proc.wait_ready(timeout_s)
    except BaseException:
        proc.cleanup()
        raise


class NodeSet:
    """Expert nodes owned by one test or fixture; ``close`` (or leaving the ``with``) kills what is left.

    ``start`` launches every node first and only then waits for the ready lines,
    so the processes' torch imports overlap.
    """

    def __init__(self):
        self.procs: list[ExpertProc] = []

    def start(self, model_dir: str | Path, specs: Iterable[str], extra_args: Sequence[str] = (),
              timeout_s: float = READY_TIMEOUT_S) -> list[ExpertProc]:
        return self.start_many([(model_dir, spec) for spec in specs], extra_args, timeout_s)

    def start_many(self, nodes: Iterable[tuple[str | Path, str]], extra_args: Sequence[str] = (),
                   timeout_s: float = READY_TIMEOUT_S) -> list[ExpertProc]:
        """[(model_dir, spec)] -> ready processes, in the same order."""
        launched = []
        for model_dir, spec in nodes:
            proc = launch_expert_node(model_dir, spec, extra_args)
            self.procs.append(proc)
            launched.append(proc)
        deadline = time.monotonic() + timeout_s
        for proc in launched:
            proc.wait_ready(max(1.0, deadline - time.monotonic()))
        return launched

    def close(self) -> None:
        for proc in self.procs:
            if proc.alive():
                if proc.stopped:
                    proc.cont()
                proc.kill()
        for proc in self.procs:
            proc.cleanup()
        self.procs.clear()

    def __enter__(self) -> "NodeSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def node_set_fixture(scope: str = "function"):
    """A pytest fixture yielding a fresh :class:`NodeSet`, closed at teardown::

        nodes = node_set_fixture("module")   # at module level in a test file
    """
    import pytest

    @pytest.fixture(scope=scope)
    def _nodes():
        with NodeSet() as nodes:
            yield nodes

    return _nodes


def node_list(procs: Sequence[ExpertProc]) -> list[tuple[str, str]]:
    """[(address, spec)] as ``build_remote`` takes it."""
    return [(p.address, p.spec) for p in procs]


def expert_nodes_flag(procs: Sequence[ExpertProc]) -> str:
    """``HOST:PORT=SPEC,...`` for ``--expert-nodes``."""
    return ",".join(f"{p.address}={p.spec}" for p in procs)
