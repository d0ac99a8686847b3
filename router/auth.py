"""Router security: TLS (optionally mutual) and the bearer-token check on the Inference service.

Health and reflection stay open (probes carry no token); every ``moemesh.v1.Inference`` method
requires ``authorization: Bearer <token>`` when the router has a token. The router's token file may
hold several tokens, one per line (one per client: the per-client limits tell clients apart by it).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from pathlib import Path

import grpc

from moemesh.errors import UnauthenticatedError
from moemesh.wire.status import abort
from moemesh.wire.tls import SecurityConfigError, TLSFiles, read_file as _read  # noqa: F401  (re-exported)
from moemesh.v1 import inference_pb2

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


def read_token_file(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped); an error if unreadable or empty."""
    token = _read(path, "auth token file (--auth-token-file)").decode(errors="replace").strip()
    if not token or any(c.isspace() for c in token):
        raise SecurityConfigError(f"auth token file {str(path)!r} must hold one token without spaces")
    return token


def read_tokens_file(path: str | Path) -> tuple[str, ...]:
    """The bearer tokens in ``path``, one per line (blank lines and ``#`` comments skipped); an error if none."""
    text = _read(path, "auth token file (--auth-token-file)").decode(errors="replace")
    tokens = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not tokens or any(any(c.isspace() for c in t) for t in tokens):
        raise SecurityConfigError(f"auth token file {str(path)!r} must hold one token per line, without spaces")
    return tokens


def _deny_unary(message: str):
    async def deny(request, context):
        await abort(context, UnauthenticatedError(message))
    return deny


def _deny_stream(message: str):
    async def deny(request, context):
        await abort(context, UnauthenticatedError(message))
        yield  # pragma: no cover - makes this an async generator, as a server-streaming handler must be
    return deny


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses Inference calls without ``authorization: Bearer <token>`` (UNAUTHENTICATED)."""

    def __init__(self, token: str | Sequence[str], service: str = INFERENCE_SERVICE):
        tokens = (token,) if isinstance(token, str) else tuple(token)
        if not tokens or not all(tokens):
            raise SecurityConfigError("the bearer token is empty")
        self._expected = [f"Bearer {t}".encode() for t in tokens]
        self._prefix = f"/{service}/"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefix):
            return handler
        given = next((v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"), None)
        if given is not None and _matches(given.encode() if isinstance(given, str) else given, self._expected):
            return handler
        message = ("missing bearer token: send metadata 'authorization: Bearer <token>'" if given is None
                   else "wrong bearer token")
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _deny_stream(message), handler.request_deserializer, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            _deny_unary(message), handler.request_deserializer, handler.response_serializer)


def _matches(given: bytes, expected: list[bytes]) -> bool:
    """Whether ``given`` is one of ``expected``, comparing with every one in constant time (no early exit)."""
    found = False
    for token in expected:
        found |= hmac.compare_digest(given, token)
    return found
