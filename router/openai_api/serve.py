"""Serving the door: uvicorn on the router's own asyncio loop (one process, one loop, no thread).

``uvicorn.Server(Config(app, ...)).serve()`` runs as a task beside the gRPC server; the router owns the
signals (uvicorn's handlers are not installed) and the socket (bound here, so ``--http-port 0`` reports
the port it got and a busy port fails at start). uvicorn's own log lines go through structlog at
warning and above (stdout stays the router's: ``moemesh up`` reads its ready line there); there is no
access log (the door logs its own events, with the request id). With TLS the door serves HTTPS with
the router's certificate; with ``--tls-ca`` the handshake requires a client certificate of that CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn

from moemesh.logs import get_logger
from moemesh.wire.tls import TLSFiles

log = get_logger("moemesh.router.http")
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


class _ToStructlog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower()
        getattr(log, level if level in ("warning", "error", "critical") else "info")(
            "uvicorn", message=record.getMessage())


def _route_uvicorn_logs() -> None:
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [_ToStructlog()]
        logger.setLevel(logging.WARNING)
        logger.propagate = False


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the router handles SIGTERM/SIGINT and stops the door itself
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"the HTTP door cannot listen on {host}:{port} (--http-port): {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def ssl_options(tls: TLSFiles | None) -> dict:
    """uvicorn's TLS settings for the router's certificate (and client certificates with a CA)."""
    if tls is None:
        return {}
    options = {"ssl_certfile": tls.cert, "ssl_keyfile": tls.key}
    if tls.ca:
        options.update(ssl_cert_reqs=ssl.CERT_REQUIRED, ssl_ca_certs=tls.ca)
    return options


class HttpServer:
    """The door's HTTP(S) listener: ``await start()`` -> the port; ``await stop(grace_s)``."""

    def __init__(self, app, host: str, port: int, *, tls: TLSFiles | None = None):
        self.app, self.host, self.requested_port, self.tls = app, host, port, tls
        self.port: int | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        _route_uvicorn_logs()
        sock = _bind(self.host, self.requested_port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, **ssl_options(self.tls))
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]), name="http-door")
        while not self._server.started:  # startup is quick (no lifespan); a bad certificate fails the task
            if self._task.done():
                sock.close()
                self._task.result()
                raise OSError("the HTTP door stopped while starting")
            await asyncio.sleep(0.01)
        log.info("http_listening", host=self.host, port=self.port, tls=self.tls is not None,
                 mtls=bool(self.tls and self.tls.ca))
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = max(0.1, grace_s)
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_s + 5)
        except (asyncio.TimeoutError, Exception):
            self._server.force_exit = True
            self._task.cancel()
        self._server = self._task = None
