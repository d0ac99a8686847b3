"""Keepalive that matches: a moemesh server accepts the pings of moemesh clients on an idle connection.

gRPC's default server policy takes one ping per 5 minutes without calls and answers the third early one
with GOAWAY too_many_pings (the connection drops; the client reconnects on its next call). Here both sides
use a 1 s interval (``keepalive_ms``: gRPC's client floor), so a few seconds of idleness stand for minutes.
The control test shows the same client on a server with gRPC's default policy is sent away: the check can fail.
"""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moemesh.wire.limits import client_options
from moemesh.wire.server import create_server, server_options
from tests.helpers import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

KEEPALIVE_MS = 1_000  # gRPC clients ping at most once a second
IDLE_S = 6.0  # six client pings: the default policy's GOAWAY comes at the fourth


def _watch(channel: grpc.Channel) -> list[grpc.ChannelConnectivity]:
    states: list[grpc.ChannelConnectivity] = []
    channel.subscribe(states.append, try_to_connect=True)
    return states


def _left_ready(states) -> bool:
    """True once the channel went from READY to anything else (a GOAWAY makes it IDLE)."""
    ready = [i for i, s in enumerate(states) if s == grpc.ChannelConnectivity.READY]
    return bool(ready) and any(s != grpc.ChannelConnectivity.READY for s in states[ready[0]:])


def _check(channel) -> None:
    assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING


def test_an_idle_channel_keeps_its_connection_and_serves_the_next_call_at_once():
    server, port, health_servicer = create_server("control", lambda s: None, (), aio=False,
                                                  keepalive_ms=KEEPALIVE_MS)
    server.start()
    try:
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        with grpc.insecure_channel(f"127.0.0.1:{port}", client_options("attn", KEEPALIVE_MS)) as channel:
            states = _watch(channel)
            _check(channel)
            time.sleep(IDLE_S)  # the idleness under test (pings flow meanwhile), not a wait for something
            assert not _left_ready(states), [s.name for s in states]
            _check(channel)  # the first call after the idle period, on the same connection
            assert not _left_ready(states), [s.name for s in states]
    finally:
        server.stop(None)


def test_control_grpc_default_server_policy_sends_the_same_client_away():
    defaults = ("grpc.http2.min_ping_interval_without_data_ms",)  # left to gRPC: 5 minutes
    options = [o for o in server_options("control", keepalive_ms=KEEPALIVE_MS) if o[0] not in defaults]
    server = grpc.server(futures.ThreadPoolExecutor(2), options=options)
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", client_options("attn", KEEPALIVE_MS)) as channel:
            states = _watch(channel)
            _check(channel)
            eventually(lambda: _left_ready(states), timeout_s=20, what="GOAWAY too_many_pings from the default policy")
    finally:
        server.stop(None)
