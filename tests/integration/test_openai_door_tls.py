"""The HTTP door secured: HTTPS with the router's certificate, bearer keys, and client certificates (mTLS).

`moemesh up --tls DIR --auth-token-file F --http-port 0` (the README's secured quick start) serves HTTPS
where a caller needs a mesh `client` certificate and a key: the openai client with the mesh CA generates;
a wrong key is 401; no certificate is refused at the handshake; plain HTTP gets no answer. Two routers with
no attention node (in this process) show the other pairings: TLS + tokens alone (the CA to verify the
server, a key, no client certificate) and mTLS alone (no key) -- past the credentials they answer 503.
"""

from __future__ import annotations

import socket
import ssl

import httpx2 as httpx  # the openai client's HTTP library
import openai
import pytest

from moemesh.model.tiny import write_tiny_checkpoint
from moemesh.router.server import Router
from moemesh.wire.tls import TLSFiles
from tests.helpers import BackgroundLoop
from tests.integration.up_proc import moemesh_up
from tests.tls_certs import mesh_certs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

KEY = "door-tls-key"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return mesh_certs(tmp_path_factory.mktemp("door-certs"))


@pytest.fixture(scope="module")
def secured_mesh(tmp_path_factory, certs):
    root = tmp_path_factory.mktemp("door-tls")
    model = write_tiny_checkpoint(root / "m", hidden_size=64, layers=2, experts=4, experts_per_token=2)
    (root / "tokens").write_text(KEY + "\n")
    with moemesh_up(["--model", str(model), "--port", "0", "--http-port", "0", "--expert-nodes", "1", "--tls",
                     str(certs), "--auth-token-file", str(root / "tokens"), "--log-dir", str(root / "logs")]) as ready:
        yield ready


def _context(certs, role: str | None) -> ssl.SSLContext:
    """Verifies the server with the mesh CA; presents ROLE's certificate when given."""
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if role is not None:
        ctx.load_cert_chain(str(certs / f"{role}.pem"), str(certs / f"{role}.key"))
    return ctx


def _client(base_url: str, certs, role: str | None, key: str) -> openai.OpenAI:
    http = openai.DefaultHttpxClient(verify=_context(certs, role), timeout=60)
    return openai.OpenAI(base_url=base_url, api_key=key, http_client=http, max_retries=0)


def _refused_at_the_handshake(url: str, certs) -> None:
    """A client without a certificate: over TLS 1.2 the server's refusal ends the handshake itself; over
    TLS 1.3 the client's half of the handshake completes first and the server closes without an answer."""
    host, port = url.removeprefix("https://").split("/")[0].rsplit(":", 1)
    tls12 = _context(certs, None)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        with pytest.raises(ssl.SSLError):
            tls12.wrap_socket(raw, server_hostname=host).close()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/models", verify=_context(certs, None), headers={"Authorization": f"Bearer {KEY}"},
                  timeout=30)


def _plain_http_gets_no_answer(https_url: str) -> None:
    with pytest.raises(httpx.TransportError):  # the server speaks TLS: a plain request gets its connection closed
        httpx.get(https_url.replace("https://", "http://", 1), timeout=30)


def test_the_openai_client_with_the_mesh_ca_a_client_certificate_and_the_key_generates(secured_mesh, certs):
    url = secured_mesh["http"]
    assert url.startswith("https://127.0.0.1:") and url.endswith("/v1")
    client = _client(url, certs, "client", KEY)
    model = client.models.list().data[0].id
    got = client.completions.create(model=model, prompt="hello world", max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.usage.completion_tokens == 3 and got.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 2


def test_a_wrong_key_is_401_and_no_certificate_or_plain_http_is_refused(secured_mesh, certs):
    url = secured_mesh["http"]
    with pytest.raises(openai.AuthenticationError) as wrong:
        _client(url, certs, "client", "not-the-key").models.list()
    assert wrong.value.status_code == 401
    _refused_at_the_handshake(url, certs)
    _plain_http_gets_no_answer(url)


@pytest.fixture
def no_node_router(etcd, certs):
    bg = BackgroundLoop()
    routers = []

    def start(tls: TLSFiles, auth_token: str | None) -> str:
        router = Router(etcd.endpoint, f"door-tls-{len(routers)}", tls=tls, auth_token=auth_token, http_port=0)
        routers.append(router)
        bg.run(router.start())
        bg.run(router.connected(30))
        return f"https://127.0.0.1:{router.http_port}/v1"

    yield start
    for router in routers:
        bg.run(router.stop(1))
    bg.close()


def _past_the_credentials(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as err:  # the door answered: no attention node here
        client.models.list()
    assert err.value.status_code == 503 and "no attention node" in err.value.message


def test_tls_with_keys_needs_the_key_but_no_client_certificate(no_node_router, certs):
    url = no_node_router(TLSFiles(str(certs / "router.pem"), str(certs / "router.key")), KEY)
    _past_the_credentials(_client(url, certs, None, KEY))
    with pytest.raises(openai.AuthenticationError) as wrong:
        _client(url, certs, None, "not-the-key").models.list()
    assert wrong.value.status_code == 401
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the mesh CA
        httpx.get(f"{url}/models", timeout=30)
    _plain_http_gets_no_answer(url)


def test_mtls_without_keys_needs_a_mesh_client_certificate(no_node_router, certs):
    url = no_node_router(TLSFiles(str(certs / "router.pem"), str(certs / "router.key"), str(certs / "ca.pem")), None)
    _refused_at_the_handshake(url, certs)
    _past_the_credentials(_client(url, certs, "client", "unused"))
