"""Router security: TLS (optionally mutual) and the bearer-token check on the Inference service.

Health and reflection stay open (probes carry no token); every ``moemesh.v1.Inference`` method
requires ``authorization: Bearer <token>`` when the router has a token.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

from moemesh.errors import MoemeshError
from moemesh.v1 import inference_pb2

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


class SecurityConfigError(MoemeshError, ValueError):
    """A TLS or token option is wrong (missing file, half a key pair); the message says which."""


def _read(path: str | Path, what: str) -> bytes:
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
        pair = (_read(self.key, "TLS key (--tls-key)"), _read(self.cert, "TLS certificate (--tls-cert)"))
        root = None if self.ca is None else _read(self.ca, "client CA (--tls-ca)")
        return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


def read_token_file(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped); an error if unreadable or empty."""
    token = _read(path, "auth token file (--auth-token-file)").decode(errors="replace").strip()
    if not token or any(c.isspace() for c in token):
        raise SecurityConfigError(f"auth token file {str(path)!r} must hold one token without spaces")
    return token


def _deny_unary(message: str):
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    return deny


def _deny_stream(message: str):
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as a server-streaming handler must be
    return deny


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses Inference calls without ``authorization: Bearer <token>`` (UNAUTHENTICATED)."""

    def __init__(self, token: str, service: str = INFERENCE_SERVICE):
        if not token:
            raise SecurityConfigError("the bearer token is empty")
        self._expected = f"Bearer {token}".encode()
        self._prefix = f"/{service}/"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefix):
            return handler
        given = next((v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"), None)
        if given is not None and hmac.compare_digest(
                given.encode() if isinstance(given, str) else given, self._expected):
            return handler
        message = ("missing bearer token: send metadata 'authorization: Bearer <token>'" if given is None
                   else "wrong bearer token")
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _deny_stream(message), handler.request_deserializer, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            _deny_unary(message), handler.request_deserializer, handler.response_serializer)
