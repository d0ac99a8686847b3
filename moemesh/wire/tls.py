"""TLS for every moemesh server and internal client: one set of PEM files per process.

A server given ``--tls-cert/--tls-key`` serves TLS; with ``--tls-ca`` it requires client
certificates signed by that CA (mTLS). Inside a mesh, one CA signs every node: a process uses its
own certificate and key as the client certificate when it dials other nodes, and the CA to verify
them, so turning TLS on for the mesh means giving every role the same three flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from moemesh.errors import MoemeshError


class SecurityConfigError(MoemeshError, ValueError):
    """A TLS or token option is wrong (missing file, half a key pair); the message says which."""


def read_file(path: str | Path, what: str) -> bytes:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read {what} {str(p)!r}: {exc.strerror or exc}") from None
    if not data.strip():
        raise SecurityConfigError(f"{what} {str(p)!r} is empty")
    return data


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS server port; with ``ca``, clients must present a certificate it signed (mTLS)."""

    cert: str
    key: str
    ca: str | None = None

    @classmethod
    def from_flags(cls, cert: str | None, key: str | None, ca: str | None = None) -> "TLSFiles | None":
        """``--tls-cert/--tls-key/--tls-ca`` -> TLSFiles, None when none is given; errors for half a set."""
        if cert is None and key is None:
            if ca is not None:
                raise SecurityConfigError("--tls-ca needs --tls-cert and --tls-key (mTLS runs over TLS)")
            return None
        if cert is None or key is None:
            raise SecurityConfigError("--tls-cert and --tls-key go together: give both, or neither")
        files = cls(str(cert), str(key), None if ca is None else str(ca))
        files.server_credentials()  # unreadable files fail here, before binding
        return files

    def server_credentials(self) -> grpc.ServerCredentials:
        pair = (read_file(self.key, "TLS key (--tls-key)"), read_file(self.cert, "TLS certificate (--tls-cert)"))
        root = None if self.ca is None else read_file(self.ca, "client CA (--tls-ca)")
        return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Dialing another node of the mesh: verify it with the CA, present our own certificate."""
        root = None if self.ca is None else read_file(self.ca, "CA (--tls-ca)")
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=read_file(self.key, "TLS key"),
                                            certificate_chain=read_file(self.cert, "TLS certificate"))


def add_port(server, address: str, tls: TLSFiles | None) -> int:
    """Bind ``address`` with or without TLS; an OSError naming the address when it cannot."""
    try:
        bound = server.add_secure_port(address, tls.server_credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError as exc:  # newer grpc raises where older returned 0
        raise OSError(f"could not bind {address}: {exc}; is the port in use?") from None
    if bound == 0:
        raise OSError(f"could not bind {address}: is the port in use?")
    return bound


# This process's bearer token for the nodes it dials, set once at startup by its entry point
# (moemesh.wire.identity.use_tokens); None: it dials with its certificate alone, or anonymously.
_dial_metadata: tuple[tuple[str, str], ...] = ()


def set_dial_token(token: str | None) -> None:
    global _dial_metadata
    _dial_metadata = (("authorization", f"Bearer {token}"),) if token else ()


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)
        self.metadata = metadata


def _with_token(details, aio: bool):
    metadata = (*tuple(details.metadata or ()), *_dial_metadata)
    if aio:
        return details._replace(metadata=grpc.aio.Metadata(*metadata))
    return _CallDetails(details, metadata)


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds this process's ``authorization`` metadata to every call of a sync channel."""

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_token(details, False), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(_with_token(details, False), requests)

    intercept_stream_stream = intercept_stream_unary


def _aio_token_interceptors():
    class UU(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            return await continuation(_with_token(details, True), request)

    class US(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, details, request):
            return await continuation(_with_token(details, True), request)

    class SU(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, details, requests):
            return await continuation(_with_token(details, True), requests)

    class SS(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, details, requests):
            return await continuation(_with_token(details, True), requests)

    return [UU(), US(), SU(), SS()]


def channel(address: str, tls: TLSFiles | None, options, aio: bool = False):
    """A channel to another mesh process: TLS when this process has TLS files; its token on every call if set."""
    if aio:
        interceptors = _aio_token_interceptors() if _dial_metadata else None
        if tls is None:
            return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
        return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options, interceptors=interceptors)
    ch = (grpc.insecure_channel(address, options=options) if tls is None
          else grpc.secure_channel(address, tls.channel_credentials(), options=options))
    return grpc.intercept_channel(ch, _TokenInterceptor()) if _dial_metadata else ch
