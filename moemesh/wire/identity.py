"""Who is calling, and what each role may call: the mesh's identities and its one authorization table.

Identities come from two places:

- an mTLS client certificate: its SAN holds ``spiffe://moemesh/<cluster>/<role>/<name>`` (``moemesh
  certs`` writes such certificates). The TLS handshake has already checked that the mesh CA signed it
  (servers with a CA require client certificates), so the role in the URI is trusted as is;
- a bearer token in the ``authorization: Bearer <token>`` metadata, looked up in a :class:`TokenBook`
  (role -> token) in constant time. Tokens are never logged or put in error messages.

:func:`decide` is the whole policy, a pure function of (method, identity): health is open to anyone,
reflection to any identity, and each service to the roles in :data:`POLICY`. A server carries the
check only when it has credentials (an mTLS CA or tokens); a mesh without any runs open, as before.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from moemesh.wire import tls as _tls
from moemesh.wire.tls import SecurityConfigError, read_file

ROLES = ("client", "router", "attn", "expert", "operator")
SPIFFE_PREFIX = "spiffe://moemesh/"

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")
INFERENCE = "moemesh.v1.Inference"
ATTENTION = "moemesh.v1.AttentionNode"
DISPATCH = "moemesh.v1.ExpertDispatch"
TORCH_TRANSPORT = "moemesh.v1.TorchTransport"
CONTROL = "moemesh.v1.MeshControl"

# (service, method or "*") -> the roles that may call it. Exact methods win over "*".
POLICY: dict[tuple[str, str], frozenset[str]] = {
    (INFERENCE, "*"): frozenset({"client", "operator"}),  # `moemesh status` runs with either credential
    (ATTENTION, "*"): frozenset({"router"}),
    (DISPATCH, "*"): frozenset({"attn"}),
    (DISPATCH, "Info"): frozenset({"attn", "router"}),  # the router's leader reads loads and held experts
    (TORCH_TRANSPORT, "*"): frozenset({"attn"}),
    (CONTROL, "*"): frozenset({"operator"}),
}


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: its role, its name (the URI's last part, or "token"), and how it proved it."""

    role: str
    name: str
    via: str  # "mtls" or "token"
    cluster: str = ""

    def __str__(self) -> str:
        return f"{self.role}/{self.name} ({self.via})"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    code: str  # "OK", "UNAUTHENTICATED" or "PERMISSION_DENIED" (grpc.StatusCode names)
    message: str = ""


def spiffe_uri(cluster: str, role: str, name: str) -> str:
    """The SAN URI a certificate of ``role`` carries: ``spiffe://moemesh/<cluster>/<role>/<name>``."""
    for part, value in (("cluster", cluster), ("role", role), ("name", name)):
        if not value or "/" in value or any(c.isspace() for c in value):
            raise SecurityConfigError(f"{part} {value!r} must be a non-empty word without '/' or spaces")
    return f"{SPIFFE_PREFIX}{cluster}/{role}/{name}"


def identity_from_uri(uri: str, via: str = "mtls") -> Identity | None:
    """The identity in a moemesh SPIFFE URI; None for any other URI (or an unknown role)."""
    if not uri.startswith(SPIFFE_PREFIX):
        return None
    parts = uri[len(SPIFFE_PREFIX):].split("/")
    if len(parts) != 3 or not all(parts) or parts[1] not in ROLES:
        return None
    cluster, role, name = parts
    return Identity(role, name, via, cluster)


@lru_cache(maxsize=256)
def identity_from_cert(pem: bytes) -> Identity | None:
    """The moemesh identity in a PEM certificate's SAN URIs; None when it has none (or several that disagree)."""
    from cryptography import x509  # here: only servers with mTLS parse certificates

    try:
        cert = x509.load_pem_x509_certificate(pem)
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.UniformResourceIdentifier)
    except (ValueError, x509.ExtensionNotFound):
        return None
    found = {i for i in (identity_from_uri(u) for u in uris) if i is not None}
    return found.pop() if len(found) == 1 else None


class TokenBook:
    """Bearer tokens of the roles (a role may have several: one per client); :meth:`lookup` compares a presented
    token against every one in constant time."""

    def __init__(self, tokens: dict[str, str | Sequence[str]]):
        entries = []
        for role, given in tokens.items():
            if role not in ROLES:
                raise SecurityConfigError(f"unknown role {role!r} for a token; roles: {', '.join(ROLES)}")
            for token in (given,) if isinstance(given, str) else tuple(given):
                if not token or any(c.isspace() for c in token):
                    raise SecurityConfigError(f"the {role} token must be one word without spaces")
                # Digests, so that every comparison is over 32 bytes whatever the tokens' lengths.
                entries.append((role, hashlib.sha256(token.encode()).digest()))
        if any(not (given if isinstance(given, str) else tuple(given)) for given in tokens.values()):
            raise SecurityConfigError("a role was given no token")
        self._entries: tuple[tuple[str, bytes], ...] = tuple(entries)

    def with_tokens(self, role: str, tokens: str | Sequence[str]) -> "TokenBook":
        """This book with ``role``'s tokens replaced by ``tokens``."""
        book = TokenBook({role: tokens})
        book._entries = (*(e for e in self._entries if e[0] != role), *book._entries)
        return book

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(role for role, _ in self._entries)

    def lookup(self, token: str | bytes) -> str | None:
        """The role whose token this is, or None; every digest is compared (no early exit)."""
        given = hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()
        found = None
        for role, digest in self._entries:
            if hmac.compare_digest(given, digest):
                found = role
        return found

    def __repr__(self) -> str:  # never the tokens
        return f"TokenBook(roles={sorted(self.roles)})"


def read_token_file(path: str | Path, what: str = "auth token file (--auth-token-file)") -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped); an error if unreadable or empty."""
    token = read_file(path, what).decode(errors="replace").strip()
    if not token or any(c.isspace() for c in token):
        raise SecurityConfigError(f"{what} {str(path)!r} must hold one token without spaces")
    return token


def bearer_of(metadata) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry; "" when the entry is not a bearer."""
    for key, value in metadata or ():
        if key == "authorization":
            value = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def split_method(method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> ``("pkg.Service", "Method")``."""
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def allowed_roles(service: str, method: str) -> frozenset[str]:
    """The roles :data:`POLICY` lets call ``service/method``; empty for a service it does not name."""
    return POLICY.get((service, method), POLICY.get((service, "*"), frozenset()))


def decide(method: str, identity: Identity | None, token_error: str | None = None) -> Decision:
    """Allow or refuse a call of ``method`` (``/pkg.Service/Method``) by ``identity`` (None: anonymous).

    ``token_error``: why a presented token was not accepted (the call then counts as anonymous).
    """
    service, name = split_method(method)
    if service == HEALTH_SERVICE:
        return Decision(True, "OK")
    if identity is None:
        why = token_error or ("no credentials: present a moemesh certificate (mTLS) or send metadata "
                              "'authorization: Bearer <token>'")
        return Decision(False, "UNAUTHENTICATED", f"{service}/{name} needs credentials; {why}")
    if service in REFLECTION_SERVICES:
        return Decision(True, "OK")
    roles = allowed_roles(service, name)
    if identity.role in roles:
        return Decision(True, "OK")
    may = ", ".join(sorted(roles)) or "no role"
    return Decision(False, "PERMISSION_DENIED",
                    f"{identity.role} credentials may not call {service}/{name}; {may} may")


def read_role_tokens(path: str | Path) -> dict[str, str]:
    """``--auth-tokens F``: one ``<role> <token>`` line per role (``#`` comments); role -> token."""
    tokens: dict[str, str] = {}
    text = read_file(path, "tokens file (--auth-tokens)").decode(errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ROLES:
            raise SecurityConfigError(f"tokens file {str(path)!r} line {number}: expected '<role> <token>' with a "
                                      f"role among {', '.join(ROLES)}")  # the line itself may hold a token
        if parts[0] in tokens:
            raise SecurityConfigError(f"tokens file {str(path)!r} line {number}: a second {parts[0]} token")
        tokens[parts[0]] = parts[1]
    if not tokens:
        raise SecurityConfigError(f"tokens file {str(path)!r} holds no tokens")
    return tokens


_process_tokens: TokenBook | None = None


def use_tokens(tokens: dict[str, str] | None, role: str) -> TokenBook | None:
    """Once, at a process's start: its servers accept ``tokens`` (as their roles); it dials with ``tokens[role]``."""
    global _process_tokens
    _process_tokens = TokenBook(tokens) if tokens else None
    _tls.set_dial_token((tokens or {}).get(role))
    return _process_tokens


def process_tokens() -> TokenBook | None:
    """The tokens this process's servers accept (:func:`use_tokens`); None: certificates only, or open."""
    return _process_tokens
