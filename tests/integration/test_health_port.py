"""A role with an mTLS service port still answers plaintext health checks on --health-port (native probes)."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.launch.etcd_server import free_port
from moemesh.model.tiny import write_tiny_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]


def test_plaintext_health_port_beside_an_mtls_service_port(tmp_path):
    from tests.tls_certs import mesh_certs

    certs = mesh_certs(tmp_path)
    model = write_tiny_checkpoint(tmp_path / "m", arch="deepseek_v2", hidden_size=64, layers=2, experts=4,
                                  experts_per_token=2)
    health_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moemesh.cli", "expert-node", "--model", str(model), "--experts", "all",
         "--tls-cert", str(certs / "expert.pem"), "--tls-key", str(certs / "expert.key"), "--tls-ca",
         str(certs / "ca.pem"), "--health-port", str(health_port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = json.loads(proc.stdout.readline())["port"]
        request = health_pb2.HealthCheckRequest(service="")
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(request, timeout=3)  # the service port is mTLS only
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
