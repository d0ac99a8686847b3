"""The server side of :mod:`moemesh.wire.identity`: who the caller is, and the interceptor that refuses calls.

:class:`Authenticator` turns a call's TLS peer (``context.auth_context()``) and metadata into an
:class:`~moemesh.wire.identity.Identity`; :class:`AuthInterceptor` (grpc.aio) and
:class:`SyncAuthInterceptor` (thread-pool servers) run :func:`~moemesh.wire.identity.decide` before
every handler and end refused calls with UNAUTHENTICATED or PERMISSION_DENIED. The peer certificate is
only in the call's context, so the check wraps the handler rather than answering from
``intercept_service``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import grpc

from moemesh.logs import get_logger
from moemesh.wire.identity import Decision, Identity, TokenBook, bearer_of, decide, identity_from_cert

log = get_logger("moemesh.wire.authz")

NO_URI = ("the client certificate carries no moemesh identity (a SAN URI spiffe://moemesh/<cluster>/<role>/<name>; "
          "`moemesh certs` makes such certificates)")


@dataclass(frozen=True)
class Authenticator:
    """A server's credentials: ``mtls`` (the TLS port requires client certificates of the mesh CA) and tokens."""

    mtls: bool = False
    tokens: TokenBook | None = None

    @property
    def secured(self) -> bool:
        """A server with any credential checks every call; one with none runs open."""
        return self.mtls or self.tokens is not None

    def identify(self, auth_context: dict, metadata) -> tuple[Identity | None, str | None]:
        """(the caller's identity or None, why a presented credential was not accepted)."""
        token = bearer_of(metadata)
        if token is not None and self.tokens is not None:
            role = self.tokens.lookup(token) if token else None
            if role is None:
                return None, "wrong bearer token"
            return Identity(role, "token", "token"), None
        pems = auth_context.get("x509_pem_cert") or ()
        if not (self.mtls and pems):
            return None, None
        identity = identity_from_cert(bytes(pems[0]))
        if identity is None:
            return None, NO_URI
        if self.tokens is not None and identity.role in self.tokens.roles:
            # The operator gave this role a token here: its certificate alone is not enough.
            return None, f"the {identity.role} role must send its bearer token ('authorization: Bearer <token>')"
        return identity, None

    def check(self, method: str, auth_context: dict, metadata) -> Decision:
        identity, why = self.identify(auth_context, metadata)
        decision = decide(method, identity, why)
        if not decision.allowed:
            log.warning("call_refused", method=method, code=decision.code, caller=str(identity) if identity else None)
        return decision


def _kind(handler) -> str:
    return {(False, False): "unary_unary", (False, True): "unary_stream", (True, False): "stream_unary",
            (True, True): "stream_stream"}[(handler.request_streaming, handler.response_streaming)]


def _wrap_aio(behavior, auth: Authenticator, method: str, metadata):
    async def refuse(context, decision: Decision):
        await context.abort(getattr(grpc.StatusCode, decision.code), decision.message)

    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            decision = auth.check(method, context.auth_context(), metadata)
            if not decision.allowed:
                await refuse(context, decision)
            async for response in behavior(request, context):
                yield response
        return stream

    async def call(request, context):
        decision = auth.check(method, context.auth_context(), metadata)
        if not decision.allowed:
            await refuse(context, decision)
        return await behavior(request, context)
    return call


def _wrap_sync(behavior, auth: Authenticator, method: str, metadata, response_streaming: bool):
    def refuse_if_denied(context):
        decision = auth.check(method, context.auth_context(), metadata)
        if not decision.allowed:
            context.abort(getattr(grpc.StatusCode, decision.code), decision.message)  # raises

    if response_streaming:
        def stream(request, context):
            refuse_if_denied(context)
            yield from behavior(request, context)
        return stream

    def call(request, context):
        refuse_if_denied(context)
        return behavior(request, context)
    return call


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """grpc.aio: every call is authenticated and authorized (see :func:`moemesh.wire.identity.decide`)."""

    def __init__(self, auth: Authenticator):
        self.auth = auth

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        kind = _kind(handler)
        wrapped = _wrap_aio(getattr(handler, kind), self.auth, handler_call_details.method,
                            tuple(handler_call_details.invocation_metadata or ()))
        return handler._replace(**{kind: wrapped})


class SyncAuthInterceptor(grpc.ServerInterceptor):
    """Thread-pool servers: the same as :class:`AuthInterceptor`."""

    def __init__(self, auth: Authenticator):
        self.auth = auth

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        kind = _kind(handler)
        wrapped = _wrap_sync(getattr(handler, kind), self.auth, handler_call_details.method,
                             tuple(handler_call_details.invocation_metadata or ()), handler.response_streaming)
        return handler._replace(**{kind: wrapped})
