"""Who may call the HTTP door: the same credentials as the router's gRPC port (docs/security.md).

``Authorization: Bearer <key>`` is looked up in the router's :class:`~moemesh.wire.identity.TokenBook`
(``--auth-token-file`` clients, ``--auth-tokens`` roles); the Inference roles (client, operator) may
call, another role's token is refused (403), a missing or unknown one is 401 with ``WWW-Authenticate``.
With mTLS (``--tls-ca``) the door's TLS handshake itself requires a certificate of the mesh CA;
uvicorn does not show the certificate to the app, so its role is not checked over HTTP, and when
the client role has tokens a bearer key is required on top of the certificate. No credential: open.
Keys are never logged.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from moemesh.wire.authz import Authenticator
from moemesh.wire.identity import INFERENCE, allowed_roles, bearer_of

from ..admission import Caller
from .errors import APIError

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="moemesh"'}


@dataclass(frozen=True)
class HttpAuth:
    """The door's check, from the router's :class:`Authenticator`."""

    auth: Authenticator

    @property
    def needs_token(self) -> bool:
        """A bearer key is required whenever the router has tokens, unless mTLS alone stands for the
        Inference roles (no client/operator token: the handshake checked the certificate). A router whose
        tokens are only other roles' (``--auth-tokens`` with router/attn lines) answers no anonymous caller:
        its gRPC port would not either."""
        if self.auth.tokens is None:
            return False
        inference_tokens = bool(self.auth.tokens.roles & allowed_roles(INFERENCE, "*"))
        return inference_tokens or not self.auth.mtls

    def check(self, authorization: str | None) -> None:
        """Raise APIError 401/403 unless the caller may use the door."""
        if not self.needs_token:
            return  # open (no credential at all), or mTLS alone (the handshake checked the certificate)
        token = bearer_of((("authorization", authorization),)) if authorization is not None else None
        if not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>' with one of the router's "
                           "client tokens", code="invalid_api_key", headers=CHALLENGE)
        role = self.auth.tokens.lookup(token)
        if role is None:
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers=CHALLENGE)
        if role not in allowed_roles(INFERENCE, "*"):
            raise APIError(403, f"{role} credentials may not call the inference API; client or operator may",
                           code="permission_denied")


def http_caller(request: Request) -> Caller:
    """The caller's identity parts, told apart like gRPC callers (bearer fingerprint, else address)."""
    client = request.client
    host = client.host if client else ""
    kind = "ipv6" if ":" in host else "ipv4"
    peer = f"{kind}:[{host}]:{client.port}" if kind == "ipv6" else f"{kind}:{host}:{client.port if client else 0}"
    return Caller(authorization=request.headers.get("authorization"), peer=peer)
