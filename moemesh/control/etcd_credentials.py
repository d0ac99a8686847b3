"""How a process proves itself to a secured etcd: TLS files and/or a user, as one typed record.

Pure (no etcd client): the CLI builds an :class:`EtcdCredentials` from ``--etcd-ca/--etcd-cert/--etcd-key/
--etcd-user/--etcd-password-file`` and hands it to ``Registry.connect``. The password is read from a file,
never from the command line (``ps`` shows argv to every user), and it is never printed: the record's repr
and :meth:`describe` leave it out.

- ``ca``: verify etcd's server certificate with this CA (turns TLS on; without it, but with a client
  certificate, the system roots verify etcd).
- ``cert`` + ``key``: present this client certificate (etcd started with ``--client-cert-auth``; with etcd
  auth on and no password, etcd takes the certificate's CN as the user name).
- ``user`` + ``password``: etcd auth (the client signs in and sends the token etcd gives it on every call).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moemesh.wire.tls import SecurityConfigError, read_file


@dataclass(frozen=True)
class EtcdCredentials:
    """TLS files and/or user + password for etcd; ``password_file`` is kept to pass on to child processes."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise SecurityConfigError("--etcd-cert and --etcd-key go together: give both, or neither")
        if (self.user is None) != (self.password is None):
            raise SecurityConfigError("--etcd-user and --etcd-password-file go together: give both, or neither")
        if self.user is not None and not self.user.strip():
            raise SecurityConfigError("--etcd-user is empty")

    @classmethod
    def from_flags(cls, ca: str | None = None, cert: str | None = None, key: str | None = None,
                   user: str | None = None, password_file: str | None = None) -> "EtcdCredentials | None":
        """The flags as a record (None when none is given); unreadable files fail here, before any dialing."""
        if all(v is None for v in (ca, cert, key, user, password_file)):
            return None
        password = None if password_file is None else read_password_file(password_file)
        creds = cls(_abs(ca), _abs(cert), _abs(key), user, password, _abs(password_file))
        if creds.tls:
            creds.channel_credentials()  # a missing or empty CA, certificate or key is one line now
        return creds

    @property
    def tls(self) -> bool:
        """Dial etcd over TLS (a CA to verify it, or a client certificate to present)."""
        return self.ca is not None or self.cert is not None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def channel_credentials(self):
        """gRPC channel credentials: verify etcd with ``ca`` (system roots without), present ``cert``."""
        import grpc

        root = None if self.ca is None else read_file(self.ca, "etcd CA (--etcd-ca)")
        key = None if self.key is None else read_file(self.key, "etcd client key (--etcd-key)")
        chain = None if self.cert is None else read_file(self.cert, "etcd client certificate (--etcd-cert)")
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)

    def describe(self) -> str:
        """For logs and errors: what is used, never the password."""
        parts = [("TLS, CA " + self.ca) if self.ca else ("TLS, system roots" if self.tls else "plaintext")]
        if self.cert:
            parts.append(f"client certificate {self.cert}")
        if self.user:
            parts.append(f"user {self.user!r}")
        return "; ".join(parts)

    def to_args(self) -> list[str]:
        """The same credentials as flags for a child process (the password travels as its file's path)."""
        out: list[str] = []
        for flag, value in (("--etcd-ca", self.ca), ("--etcd-cert", self.cert), ("--etcd-key", self.key),
                            ("--etcd-user", self.user), ("--etcd-password-file", self.password_file)):
            if value is not None:
                out += [flag, value]
        if self.user is not None and self.password_file is None:
            raise SecurityConfigError("these etcd credentials hold a password but no file to pass it on in")
        return out


def read_password_file(path: str | Path) -> str:
    """The password in ``path`` (one line; the trailing newline is dropped); errors name the file, not the content."""
    text = read_file(path, "etcd password file (--etcd-password-file)").decode("utf-8", "replace")
    password = text.rstrip("\r\n")
    if "\n" in password or not password:
        raise SecurityConfigError(f"etcd password file {str(path)!r} must hold one line: the password")
    return password


def _abs(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())
