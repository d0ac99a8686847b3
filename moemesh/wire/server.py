"""``create_server(...) -> (server, port, health)``: every moemesh gRPC server, built one way.

One table of server options (message sizes per role, keepalive), health (NOT_SERVING until the
role says otherwise) and reflection on every server, the bind with or without TLS, and the
:mod:`moemesh.wire.status` interceptor (undecodable requests and domain errors as status codes).
Roles add their servicers through ``add``, a function of the server; port 0 binds a free port.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moemesh.wire.authz import Authenticator, AuthInterceptor, SyncAuthInterceptor
from moemesh.wire.identity import process_tokens
from moemesh.wire.limits import (
    ATTN_MAX_MESSAGE_BYTES, CONTROL_MAX_MESSAGE_BYTES, ROUTER_MAX_MESSAGE_BYTES, server_keepalive,
)
from moemesh.wire.status import StatusInterceptor, SyncStatusInterceptor
from moemesh.wire.tls import TLSFiles, add_port

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# The largest message each role's server takes and sends (moemesh/wire/limits.py says where each number comes
# from). Expert nodes have none here: theirs follows from the largest step they serve, given by the caller.
MAX_MESSAGE_BYTES = {"router": ROUTER_MAX_MESSAGE_BYTES, "attn": ATTN_MAX_MESSAGE_BYTES,
                     "control": CONTROL_MAX_MESSAGE_BYTES}
# Servers ping idle clients and accept the pings of moemesh clients (limits.client_keepalive) even without calls.
KEEPALIVE_OPTIONS = server_keepalive()


def server_options(role: str, max_message_bytes: int | None = None, keepalive_ms: int | None = None
                   ) -> list[tuple[str, int]]:
    """``max_message_bytes``: the role's limit when MAX_MESSAGE_BYTES has none (expert nodes); else that table's.
    ``keepalive_ms``: another interval than the clients' default, for both sides (tests)."""
    size = max_message_bytes or MAX_MESSAGE_BYTES.get(role)
    if size is None:
        raise ValueError(f"a {role} server needs max_message_bytes (see moemesh.wire.limits)")
    keepalive = KEEPALIVE_OPTIONS if keepalive_ms is None else server_keepalive(keepalive_ms)
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size), *keepalive]


def create_server(role: str, add: Callable[[grpc.Server], None], services: Sequence[str], host: str = "127.0.0.1",
                  port: int = 0, *, tls: TLSFiles | None = None, interceptors: Sequence = (), aio: bool = True,
                  max_workers: int = 4, max_message_bytes: int | None = None, auth: Authenticator | None = None,
                  keepalive_ms: int | None = None):
    """A server with ``add``'s servicers, health and reflection, bound to ``host:port``; ``(server, port, health)``.

    ``services``: the full names ``add`` registers (reflection lists them, health reports on them).
    ``interceptors`` run before the status interceptor (after the authorization check).
    ``aio=False`` builds a thread-pool ``grpc.server`` of ``max_workers`` threads instead of grpc.aio.
    ``max_message_bytes``: the role's message limit, required for "expert" (see :func:`server_options`).
    ``keepalive_ms``: the ping interval it matches (default: the clients', moemesh.wire.limits.KEEPALIVE_MS).
    ``auth``: who may call what (:mod:`moemesh.wire.authz`); by default, the mTLS identities when ``tls``
    requires client certificates and this process's tokens (``--auth-tokens``); with neither, an open server,
    as a mesh without credentials runs.
    """
    options = server_options(role, max_message_bytes, keepalive_ms)
    if auth is None:
        auth = Authenticator(mtls=bool(tls and tls.ca), tokens=process_tokens())
    if auth.secured:
        interceptors = [AuthInterceptor(auth) if aio else SyncAuthInterceptor(auth), *interceptors]
    if aio:
        server = grpc.aio.server(options=options, interceptors=[*interceptors, StatusInterceptor()])
        health_servicer = health.aio.HealthServicer()
    else:
        pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"{role}-grpc")
        server = grpc.server(pool, options=options, interceptors=[*interceptors, SyncStatusInterceptor()])
        health_servicer = health.HealthServicer()
    add(server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*services, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    return server, add_port(server, f"{host}:{port}", tls), health_servicer
