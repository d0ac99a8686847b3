"""``moemesh certs DIR [--cluster C]``: a mesh CA and one certificate per role, for local meshes and tests.

Writes ``ca.pem``/``ca.key`` and, per role, ``<role>.pem``/``<role>.key``: ``router``, ``attn``, ``expert``
(they serve and dial: serverAuth + clientAuth), ``operator`` and ``client`` (they only dial),
``control`` (the MeshControl server of ``moemesh up``) and ``etcd`` (the embedded etcd's server certificate
and every process's etcd client certificate; it names no role, so it opens no gRPC port). Each leaf's SAN carries its identity as
``spiffe://moemesh/<cluster>/<role>/<name>`` (see :mod:`moemesh.wire.identity`) and the addresses it may
serve on: 127.0.0.1, localhost and any ``--san``. Keys are written 0600; keep ``ca.key`` away from the
nodes (only ``moemesh certs`` needs it). ``moemesh up --tls DIR`` gives each process its role's pair.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
from pathlib import Path

from moemesh.argtypes import positive_int

CALLER_ROLES = ("router", "attn", "expert", "operator", "client")
CALLERS_TOO = ("etcd",)  # not a mesh role: its holder is nobody on the gRPC ports
SERVER_ROLES = ("router", "attn", "expert", "control", "etcd")  # leaves that also serve (serverAuth)
LEAVES = ("router", "attn", "expert", "operator", "client", "control", "etcd")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("certs", help="make a mesh CA and per-role certificates (local use and tests)",
                              description="Write a CA (ca.pem, ca.key) and a certificate and key per role (router, "
                              "attn, expert, operator, client, control, etcd) into DIR, each naming its role in a SAN URI "
                              "spiffe://moemesh/<cluster>/<role>/<name>, for `moemesh up --tls DIR`.")
    p.add_argument("dir", metavar="DIR", help="where to write the files (created; must not hold a ca.pem yet)")
    p.add_argument("--cluster", default="default", help="cluster name in the identities (default: default)")
    p.add_argument("--san", action="append", default=[], metavar="HOST",
                   help="another IP or DNS name the serving certificates are valid for (repeatable)")
    p.add_argument("--days", type=positive_int, default=365, help="validity in days (default: 365)")
    return p


def run(args: argparse.Namespace) -> int:
    written = make_certs(Path(args.dir), cluster=args.cluster, sans=args.san, days=args.days)
    print(json.dumps({"event": "certs", "dir": str(Path(args.dir).resolve()), "cluster": args.cluster,
                      "files": sorted(p.name for p in written)}))
    return 0


def _write(path: Path, data: bytes, secret: bool) -> Path:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _alt_names(hosts):
    from cryptography import x509
    out = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def make_certs(d: Path, cluster: str = "default", sans=(), days: int = 365, leaves=LEAVES,
               names: dict[str, str] | None = None) -> list[Path]:
    """Write the CA and ``leaves`` into ``d``; the paths written. ``names``: role -> identity name (default: the role)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from moemesh.wire.identity import spiffe_uri
    from moemesh.wire.tls import SecurityConfigError

    names = names or {}
    for role in leaves:
        spiffe_uri(cluster, role, names.get(role, role))  # bad cluster or names fail before anything is written
    d.mkdir(parents=True, exist_ok=True)
    if (d / "ca.pem").exists():
        raise SecurityConfigError(f"{str(d)!r} already holds a CA (ca.pem); choose an empty directory")
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"moemesh {cluster} CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    written = [_write(d / "ca.pem", ca.public_bytes(serialization.Encoding.PEM), False),
               _write(d / "ca.key", _key_pem(ca_key), True)]
    hosts = ["127.0.0.1", "localhost", *sans]
    for role in leaves:
        key = _key()
        uri = spiffe_uri(cluster, role, names.get(role, role))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if role in CALLER_ROLES + CALLERS_TOO else []
        if role in SERVER_ROLES:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        san = [x509.UniformResourceIdentifier(uri), *(_alt_names(hosts) if role in SERVER_ROLES else [])]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"moemesh {cluster} {role}")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .add_extension(x509.SubjectAlternativeName(san), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
                .sign(ca_key, hashes.SHA256()))
        written += [_write(d / f"{role}.pem", cert.public_bytes(serialization.Encoding.PEM), False),
                    _write(d / f"{role}.key", _key_pem(key), True)]
    return written
