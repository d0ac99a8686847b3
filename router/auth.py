"""Router security: TLS (optionally mutual) and who may call the Inference service.

The router's port is checked like every other port of the mesh (:mod:`moemesh.wire.authz`): with
``--tls-ca`` callers present certificates whose SAN names their role; the tokens of
``--auth-token-file`` (one per line: one per client, the per-client limits tell clients apart by
them) are the ``client`` role's (``authorization: Bearer <token>``); ``--auth-tokens`` adds the other
roles' (:func:`moemesh.wire.identity.use_tokens`). Inference takes the ``client`` and ``operator``
roles; health stays open (probes carry no credentials), reflection takes any identity. A router with
no credential runs open.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moemesh.wire.authz import Authenticator
from moemesh.wire.identity import (INFERENCE as INFERENCE_SERVICE, TokenBook, process_tokens,  # noqa: F401
                                   read_role_tokens, read_token_file, use_tokens)
from moemesh.wire.tls import SecurityConfigError, TLSFiles, read_file as _read  # noqa: F401  (re-exported)


def read_tokens_file(path: str | Path) -> tuple[str, ...]:
    """The bearer tokens in ``path``, one per line (blank lines and ``#`` comments skipped); an error if none."""
    text = _read(path, "auth token file (--auth-token-file)").decode(errors="replace")
    tokens = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not tokens or any(any(c.isspace() for c in t) for t in tokens):
        raise SecurityConfigError(f"auth token file {str(path)!r} must hold one token per line, without spaces")
    return tokens


def router_authenticator(tls: TLSFiles | None, auth_token: str | Sequence[str] | None) -> Authenticator:
    """mTLS identities when the port requires client certificates; ``auth_token``: the client role's token(s)."""
    tokens = process_tokens()  # --auth-tokens
    if auth_token is not None:
        given = (auth_token,) if isinstance(auth_token, str) else tuple(auth_token)
        if not given or not all(given):
            raise SecurityConfigError("the bearer token is empty")
        tokens = tokens.with_tokens("client", given) if tokens else TokenBook({"client": given})
    return Authenticator(mtls=bool(tls and tls.ca), tokens=tokens)
