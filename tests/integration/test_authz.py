"""Every port of a `moemesh up --tls` mesh, called by every kind of caller: only the right role is served.

Real processes, real mTLS (certificates from `moemesh certs`). A caller without a certificate (plaintext,
or TLS without a client certificate, or a certificate of another CA) is refused in the TLS handshake; a
mesh certificate of the wrong role is refused with PERMISSION_DENIED; the right role is served (its
call reaches the servicer, which may still answer e.g. INVALID_ARGUMENT for the probe's bad request).
Run with ``-s`` to print the ports x callers table.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from moemesh.router import MeshClient
from moemesh.v1 import attention_pb2, control_pb2, dispatch_pb2, inference_pb2, torch_transport_pb2
from tests.tls_certs import mesh_certs

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

CALLERS = ("plaintext", "tls-no-cert", "other-ca", "client", "operator", "router", "attn", "expert")
REFUSED_CODES = {grpc.StatusCode.UNAUTHENTICATED: "UNAUTHENTICATED", grpc.StatusCode.PERMISSION_DENIED:
                 "PERMISSION_DENIED", grpc.StatusCode.UNAVAILABLE: "handshake"}
HANDSHAKE = ("plaintext", "tls-no-cert", "other-ca")


def _served(roles: set[str]) -> dict[str, str]:
    return {c: "handshake" if c in HANDSHAKE else "served" if c in roles else "PERMISSION_DENIED" for c in CALLERS}


# (row name, which address, method, kind, request) -> the roles served (see moemesh/wire/identity.py POLICY).
PROBES = [
    ("router Inference/ModelInfo", "router", "/moemesh.v1.Inference/ModelInfo", "uu",
     inference_pb2.ModelInfoRequest(), {"client", "operator"}),
    ("router reflection", "router", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "ss",
     reflection_pb2.ServerReflectionRequest(list_services=""), set(CALLERS[3:])),
    ("router health (main port)", "router", "/grpc.health.v1.Health/Check", "uu",
     health_pb2.HealthCheckRequest(), set(CALLERS[3:])),
    ("attn AttentionNode/Load", "attn", "/moemesh.v1.AttentionNode/Load", "uu", attention_pb2.LoadRequest(),
     {"router"}),
    ("attn AttentionNode/Generate", "attn", "/moemesh.v1.AttentionNode/Generate", "us",
     inference_pb2.GenerateRequest(), {"router"}),
    ("expert ExpertDispatch/Dispatch", "expert", "/moemesh.v1.ExpertDispatch/Dispatch", "ss", None, {"attn"}),
    ("expert ExpertDispatch/Info", "expert", "/moemesh.v1.ExpertDispatch/Info", "uu", dispatch_pb2.InfoRequest(),
     {"attn", "router"}),
    ("expert TorchTransport/Session", "expert", "/moemesh.v1.TorchTransport/Session", "us",
     torch_transport_pb2.SessionRequest(backend="gloo", hidden_size=1, timeout_s=1), {"attn"}),
    ("MeshControl/ListProcesses", "control", "/moemesh.v1.MeshControl/ListProcesses", "uu",
     control_pb2.ListProcessesRequest(), {"operator"}),
    ("MeshControl/AddExpertNodes", "control", "/moemesh.v1.MeshControl/AddExpertNodes", "uu",
     control_pb2.AddExpertNodesRequest(count=0), {"operator"}),  # count 0: served means INVALID_ARGUMENT
    ("MeshControl/RemoveExpertNode", "control", "/moemesh.v1.MeshControl/RemoveExpertNode", "uu",
     control_pb2.RemoveExpertNodeRequest(name="no-such-node"), {"operator"}),  # served means NOT_FOUND
]


def _channel(address: str, caller: str, certs: Path, other: Path) -> grpc.Channel:
    if caller == "plaintext":
        return grpc.insecure_channel(address)
    ca = (certs / "ca.pem").read_bytes()
    if caller == "tls-no-cert":
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca))
    d, role = (other, "attn") if caller == "other-ca" else (certs, caller)
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(
        ca, (d / f"{role}.key").read_bytes(), (d / f"{role}.pem").read_bytes()))


def _call(channel: grpc.Channel, method: str, kind: str, request) -> None:
    data = b"" if request is None else request.SerializeToString()
    if kind == "uu":
        channel.unary_unary(method)(data, timeout=10)
    elif kind == "us":
        list(channel.unary_stream(method)(data, timeout=10))
    else:
        list(channel.stream_stream(method)(iter([] if request is None else [data]), timeout=10))


def probe(address: str, caller: str, method: str, kind: str, request, certs: Path, other: Path) -> str:
    """"served" when the call reached the servicer (any answer but a refusal); else how it was refused."""
    with _channel(address, caller, certs, other) as channel:
        try:
            _call(channel, method, kind, request)
        except grpc.RpcError as exc:
            return REFUSED_CODES.get(exc.code(), f"served ({exc.code().name})")
    return "served"


def render_for(table: dict[str, dict[str, str]], callers) -> str:
    rows = ["| port / method | " + " | ".join(callers) + " |", "|---" * (len(callers) + 1) + "|"]
    rows += [f"| {name} | " + " | ".join(cells[c] for c in callers) + " |" for name, cells in table.items()]
    return "\n".join(rows)


def render(table: dict[str, dict[str, str]]) -> str:
    return render_for(table, CALLERS)


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory):
    from moemesh.model.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("authz")
    certs, other = mesh_certs(root / "certs"), mesh_certs(root / "other")
    model = write_tiny_checkpoint(root / "m", arch="deepseek_v2", hidden_size=64, layers=2, experts=4,
                                  experts_per_token=2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moemesh.cli", "up", "--model", str(model), "--port", "0", "--attn-nodes", "1",
         "--expert-nodes", "1", "--transport", "torch", "--tls", str(certs), "--log-dir", str(root / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 240)
        assert ready, "moemesh up was not ready within 240 s"
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        yield json.loads(line), certs, other
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_every_port_serves_only_its_callers(tls_mesh):
    ready, certs, other = tls_mesh
    assert ready["tls"] is True
    with MeshClient(ready["router"], ca_file=certs / "ca.pem", cert_file=certs / "operator.pem",
                    key_file=certs / "operator.key") as operator:
        nodes = operator.cluster_status()["nodes"]
    addresses = {"router": ready["router"], "control": ready["control"],
                 **{role: next(n["address"] for n in nodes if n["role"] == role) for role in ("attn", "expert")}}
    table = {name: {c: probe(addresses[where], c, method, kind, request, certs, other) for c in CALLERS}
             for name, where, method, kind, request, _ in PROBES}
    print("\n" + render(table))
    assert {name: {c: cell.split(" ")[0] for c, cell in cells.items()} for name, cells in table.items()} == {name: _served(roles) for name, _, _, _, _, roles in PROBES}


def test_the_sdk_with_a_client_certificate_generates_and_anonymous_mesh_control_is_refused(tls_mesh):
    ready, certs, _ = tls_mesh
    with MeshClient(ready["router"], ca_file=certs / "ca.pem", cert_file=certs / "client.pem",
                    key_file=certs / "client.key") as client:
        assert len(client.generate(prompt_ids=[3, 4, 5], max_tokens=3, temperature=0.0).token_ids) == 3
    run = [sys.executable, "-m", "moemesh.cli", "mesh", "--control", ready["control"], "--timeout", "10"]
    anonymous = subprocess.run([*run, "add-experts"], capture_output=True, text=True, timeout=60)
    assert anonymous.returncode == 1 and "UNAVAILABLE" in anonymous.stderr
    as_client = subprocess.run([*run, "--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / "client.pem"),
                                "--tls-key", str(certs / "client.key"), "remove-expert", "expert-0"],
                               capture_output=True, text=True, timeout=60)
    assert as_client.returncode == 1 and "PERMISSION_DENIED" in as_client.stderr
    as_operator = subprocess.run([*run, "--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / "operator.pem"),
                                  "--tls-key", str(certs / "operator.key"), "--json", "list"],
                                 capture_output=True, text=True, timeout=60)
    assert as_operator.returncode == 0, as_operator.stderr
    assert {p["role"] for p in json.loads(as_operator.stdout)["processes"]} == {"router", "attn", "expert"}


# ---- a mesh secured by tokens alone: `moemesh up --auth-token-file F` without --tls -------------------------------
TOKEN_CALLERS = ("anonymous", "wrong-token", "client", "operator", "router", "attn", "expert")


def _token_probe(address: str, caller: str, tokens: dict[str, str], method: str, kind: str, request) -> str:
    token = {"anonymous": None, "wrong-token": "not-a-mesh-token"}.get(caller, tokens.get(caller))
    metadata = None if token is None else (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(address) as channel:
        data = b"" if request is None else request.SerializeToString()
        try:
            if kind == "uu":
                channel.unary_unary(method)(data, timeout=10, metadata=metadata)
            elif kind == "us":
                list(channel.unary_stream(method)(data, timeout=10, metadata=metadata))
            else:
                list(channel.stream_stream(method)(iter([] if request is None else [data]), timeout=10,
                                                   metadata=metadata))
        except grpc.RpcError as exc:
            return REFUSED_CODES.get(exc.code(), f"served ({exc.code().name})")
    return "served"


def test_a_token_mesh_refuses_anonymous_callers_and_wrong_roles_on_every_port(tmp_path):
    from moemesh.model.tiny import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "m", arch="deepseek_v2", hidden_size=64, layers=2, experts=4,
                                  experts_per_token=2)
    (tmp_path / "client.token").write_text("the-clients-token\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moemesh.cli", "up", "--model", str(model), "--port", "0", "--attn-nodes", "1",
         "--expert-nodes", "1", "--transport", "torch", "--auth-token-file", str(tmp_path / "client.token"),
         "--log-dir", str(tmp_path / "logs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert select.select([proc.stdout], [], [], 240)[0], "moemesh up was not ready within 240 s"
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        ready = json.loads(line)
        token_dir = Path(ready["operator_token_file"]).parent
        assert (token_dir / "tokens").stat().st_mode & 0o077 == 0  # the tokens file is the user's alone
        tokens = dict(line.split() for line in (token_dir / "tokens").read_text().splitlines())
        assert set(tokens) == {"router", "attn", "expert", "operator"}  # the clients' tokens stay in their file
        tokens["client"] = "the-clients-token"
        with MeshClient(ready["router"], token="the-clients-token") as client:
            assert len(client.generate(prompt_ids=[3, 4, 5], max_tokens=3, temperature=0.0).token_ids) == 3
            with MeshClient(ready["router"], token=tokens["operator"]) as operator:
                nodes = operator.cluster_status()["nodes"]
        addresses = {"router": ready["router"], "control": ready["control"],
                     **{role: next(n["address"] for n in nodes if n["role"] == role) for role in ("attn", "expert")}}
        table = {name: {c: _token_probe(addresses[where], c, tokens, method, kind, request) for c in TOKEN_CALLERS}
                 for name, where, method, kind, request, _ in PROBES}
        print("\n" + render_for(table, TOKEN_CALLERS))
        # Only the router knows the clients' tokens: elsewhere a client token is as good as a wrong one.
        unknown = {(c, where) for c in ("anonymous", "wrong-token", "client") for where in ("attn", "expert", "control")}
        unknown |= {("anonymous", "router"), ("wrong-token", "router")}
        expected = {name: {c: "served" if "health" in name else "UNAUTHENTICATED" if (c, where) in unknown
                           else "served" if c in roles else "PERMISSION_DENIED" for c in TOKEN_CALLERS}
                    for name, where, _, _, _, roles in PROBES}
        assert {name: {c: cell.split(" ")[0] for c, cell in cells.items()} for name, cells in table.items()} == expected
        run = [sys.executable, "-m", "moemesh.cli", "mesh", "--control", ready["control"], "--timeout", "10"]
        anonymous = subprocess.run([*run, "remove-expert", "expert-0"], capture_output=True, text=True, timeout=60)
        assert anonymous.returncode == 1 and "UNAUTHENTICATED" in anonymous.stderr
        listed = subprocess.run([*run, "--token-file", ready["operator_token_file"], "--json", "list"],
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
