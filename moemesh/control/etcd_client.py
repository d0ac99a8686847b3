"""The etcd client the Registry uses: aetcd's, over TLS when the credentials ask for it.

aetcd 1.0 signs in with user + password but opens only plaintext channels (its open issue
martyanov/aetcd#37), so :class:`_TLSClient` replaces its ``connect`` step with one that opens a TLS channel;
aetcd is pinned below 1.1 because this leans on its internals. Private to ``moemesh.control.etcd``.
"""

from __future__ import annotations

import asyncio

import aetcd
import aetcd.client
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher

from moemesh.control.etcd_credentials import EtcdCredentials
from moemesh.errors import MoemeshError, UnavailableError


class RegistryError(MoemeshError):
    """etcd answered with an error."""


class RegistryUnavailable(RegistryError, UnavailableError):
    """etcd did not answer in time (down, unreachable, or hung)."""


class _TLSClient(aetcd.Client):
    """aetcd's client over a TLS channel: aetcd 1.0's ``connect`` with ``secure_channel`` for ``insecure_channel``.

    Everything else (stubs, the sign-in with user + password, the token on every call, the watcher) is
    aetcd's; tests/integration/test_etcd_secure.py runs reads, writes, leases and watches through it.
    """

    def __init__(self, *args, channel_credentials, **kwargs):
        super().__init__(*args, **kwargs)
        self._channel_credentials = channel_credentials

    @aetcd.client._handle_errors
    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # another task is connecting: wait for it
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        rpc = aetcd.rpc
        try:
            self._is_connecting = True
            self.channel = rpc.secure_channel(f"{self._host}:{self._port}", self._channel_credentials,
                                              options=self._options.items())
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                resp = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                                  metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


def _new_client(host: str, port: int, timeout_s: float, options: dict,
                credentials: EtcdCredentials | None) -> aetcd.Client:
    user = password = None
    if credentials is not None and credentials.user is not None:
        user, password = credentials.user, credentials.password
    if credentials is not None and credentials.tls:
        return _TLSClient(host, port, username=user, password=password, timeout=timeout_s, options=options,
                          channel_credentials=credentials.channel_credentials())
    return aetcd.Client(host, port, username=user, password=password, timeout=timeout_s, options=options)


def _token_refused(error: aetcd.ClientError) -> bool:
    """etcd no longer knows our sign-in token (it restarted, or the token's TTL ran out)."""
    return isinstance(error, aetcd.exceptions.UnauthenticatedError) and "invalid auth token" in str(error)


def _refusal_hint(error: aetcd.ClientError) -> str:
    text = str(error)
    if "user name is empty" in text or "permission denied" in text:
        return ("; etcd requires auth: give --etcd-user and --etcd-password-file, or a client certificate "
                "(--etcd-cert/--etcd-key) whose CN is an etcd user with access to /moemesh/")
    if "authentication failed" in text:
        return "; check --etcd-user and the password in --etcd-password-file"
    return ""
