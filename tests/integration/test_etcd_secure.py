"""A secured etcd (client TLS, client certificates, auth on) against moemesh's Registry, real processes.

What ``moemesh up`` runs for a TLS mesh (``launch/etcd_server.py::secure_etcd``): etcd serves TLS only, with
the mesh's certificate, requires client certificates the mesh CA signed, and has auth on (user root, a
generated password in a 0600 file). Anonymous and plaintext clients are refused; the Registry with the
credentials reads, writes, holds a lease and watches, also across an etcd restart (which forgets every
sign-in token, so the Registry signs in again).
"""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from moemesh.control.etcd import Registry, RegistryError, RegistryUnavailable
from moemesh.control.etcd_credentials import EtcdCredentials
from moemesh.launch.etcd_server import EtcdServer, secure_etcd
from tests.helpers import aeventually, node_record
from tests.tls_certs import make_mesh_certs

pytestmark = pytest.mark.integration
RECORD = {"address": "127.0.0.1:5000", "status": "ready", "capacity": {"slots": 4}, "experts": {"1": [0, 1]}}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_mesh_certs(tmp_path_factory.mktemp("etcd-certs"))


def _start(certs, state_dir) -> tuple[EtcdServer, EtcdCredentials]:
    secured = secure_etcd(state_dir, certs / "node.pem", certs / "node.key", certs / "ca.pem")
    server = EtcdServer(data_dir=state_dir / "etcd", tls=secured.tls, root_password=secured.credentials.password)
    return server.start(), secured.credentials


@pytest.fixture(scope="module")
def secured(certs, tmp_path_factory):
    server, creds = _start(certs, tmp_path_factory.mktemp("etcd-state"))
    try:
        yield server, creds
    finally:
        server.stop()


def test_the_password_file_is_the_owners_alone_and_never_in_reprs(secured):
    server, creds = secured
    mode = stat.S_IMODE(os.stat(creds.password_file).st_mode)
    assert mode == 0o600
    assert creds.password not in repr(creds) and creds.password not in creds.describe()
    assert creds.password not in " ".join(creds.to_args()) and server.client_url.startswith("https://")


@pytest.mark.parametrize("who, refused", [
    ("plaintext", RegistryUnavailable),  # no TLS at all: no connection
    ("tls without a client certificate", RegistryUnavailable),  # etcd requires one: no TLS session
    ("client certificate, no user", RegistryError),  # TLS ok, but anonymous: "user name is empty"/denied
    ("wrong password", RegistryError),
])
def test_anonymous_and_wrong_callers_are_refused(secured, certs, tmp_path, who, refused):
    server, creds = secured
    (tmp_path / "pw").write_text("not-the-password\n")
    credentials = {
        "plaintext": None,
        "tls without a client certificate": EtcdCredentials(ca=creds.ca),
        "client certificate, no user": EtcdCredentials(ca=creds.ca, cert=creds.cert, key=creds.key),
        "wrong password": EtcdCredentials.from_flags(creds.ca, creds.cert, creds.key, "root", str(tmp_path / "pw")),
    }[who]

    async def main():
        with pytest.raises(refused) as exc:
            reg = await Registry.connect(server.endpoint, "sec-anon", timeout_s=3.0, credentials=credentials)
            await reg.close()
        return str(exc.value)

    message = asyncio.run(main())
    if who == "client certificate, no user":
        assert "--etcd-user" in message  # says what to give
    if who == "wrong password":
        assert "--etcd-password-file" in message and "not-the-password" not in message


def test_the_registry_with_credentials_reads_writes_and_watches(secured):
    server, creds = secured

    async def main():
        async with await Registry.connect(server.endpoint, "sec-ok", ttl_s=5, credentials=creds) as reg:
            seen = []

            async def watch():
                async for ev in reg.watch_prefix(reg.keys.root):
                    seen.append(ev)

            watcher = asyncio.create_task(watch())
            assert await reg.register(node_record("expert", "expert-0", RECORD))
            key = reg.keys.node("expert", "expert-0")
            assert (await reg.get(key))["id"] == "expert-0"
            assert (await reg.lease_info()).keys == (key,)
            assert await reg.put_if_version(reg.keys.placement(), {"version": 1, "layers": {}}, 0)
            assert await reg.campaign_leader("router-a")
            await aeventually(lambda: _async({reg.keys.placement(), key} <= {e.key for e in seen}),
                              what="the watch sees both writes")
            watcher.cancel()

    asyncio.run(main())


async def _async(value):
    return value


def test_after_an_etcd_restart_the_registry_signs_in_again(certs, tmp_path):
    server, creds = _start(certs, tmp_path)
    try:
        async def main():
            async with await Registry.connect(server.endpoint, "sec-restart", ttl_s=5, credentials=creds) as reg:
                assert await reg.register(node_record("expert", "expert-1", RECORD))
                key = reg.keys.node("expert", "expert-1")
                await asyncio.to_thread(server.restart)  # etcd forgets every sign-in token

                async def back():
                    try:
                        return await reg.get(key)
                    except RegistryError:  # the first call meets the stale token, then a fresh sign-in
                        return None
                assert (await aeventually(back, what="a read after the restart"))["id"] == "expert-1"
                assert reg.lease_grants >= 1

        asyncio.run(main())
    finally:
        server.stop()
