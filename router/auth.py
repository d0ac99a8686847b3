"""Router security: TLS (optionally mutual) and who may call the Inference service.

The router's port is checked like every other port of the mesh (:mod:`moemesh.wire.authz`): with
``--tls-ca`` callers present certificates whose SAN names their role; with ``--auth-token-file`` the
token identifies the ``client`` role (``authorization: Bearer <token>``). Inference takes the
``client`` and ``operator`` roles; health stays open (probes carry no credentials), reflection takes
any identity. A router with neither credential runs open.
"""

from __future__ import annotations

from moemesh.wire.authz import Authenticator
from moemesh.wire.identity import (INFERENCE as INFERENCE_SERVICE, TokenBook, process_tokens,  # noqa: F401
                                   read_token_file, read_tokens_file, use_tokens)
from moemesh.wire.tls import SecurityConfigError, TLSFiles, read_file as _read  # noqa: F401  (re-exported)


def router_authenticator(tls: TLSFiles | None, auth_token: str | None) -> Authenticator:
    """mTLS identities when the port requires client certificates; the client token when one is set."""
    if auth_token is not None and not auth_token:
        raise SecurityConfigError("the bearer token is empty")
    tokens = process_tokens()  # --auth-tokens
    if auth_token:  # --auth-token-file: the client role's token
        tokens = tokens.with_token("client", auth_token) if tokens else TokenBook({"client": auth_token})
    return Authenticator(mtls=bool(tls and tls.ca), tokens=tokens)
