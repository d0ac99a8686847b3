"""An optional plaintext port serving only grpc.health.v1, for probes that cannot speak (m)TLS.

Kubernetes' native gRPC probes dial without TLS; when a role's service port is mTLS, they check
this port instead. It shares the role's HealthServicer, so both ports report the same status.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2_grpc

from moemesh.wire.limits import HEALTH_MAX_MESSAGE_BYTES
from moemesh.wire.tls import add_port

# Health requests name a service and answers carry one status: nothing larger is taken or sent.
OPTIONS = (("grpc.max_receive_message_length", HEALTH_MAX_MESSAGE_BYTES),
           ("grpc.max_send_message_length", HEALTH_MAX_MESSAGE_BYTES))


async def start_health_port(health_servicer, host: str, port: int | None) -> grpc.aio.Server | None:
    """Serve ``health_servicer`` alone on ``host:port`` (None: no health port): the role's ``--host``, as its
    service port; never 0.0.0.0 unless that is the host."""
    if port is None:
        return None
    server = grpc.aio.server(options=OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    add_port(server, f"{host}:{port}", None)
    await server.start()
    return server
