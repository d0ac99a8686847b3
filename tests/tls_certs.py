"""Test certificates: the one generator, ``moemesh certs`` (moemesh/cli/certs.py), into a test's directory.

``mesh_certs(d)`` -> d with ca.pem and ROLE.pem/ROLE.key for router, attn, expert, operator, client and
control, each naming its role in a SAN URI (spiffe://moemesh/<cluster>/<role>/<name>).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from moemesh.cli.certs import make_certs
from moemesh.wire.tls import TLSFiles


def mesh_certs(d: Path, cluster: str = "default", sans=()) -> Path:
    make_certs(d, cluster=cluster, sans=sans, days=1)
    return d


def make_mesh_certs(d: Path) -> Path:
    """``mesh_certs`` plus node.pem/node.key: the etcd pair (serverAuth + clientAuth, no gRPC role), for etcd tests."""
    mesh_certs(d)
    for suffix in ("pem", "key"):
        shutil.copy(d / f"etcd.{suffix}", d / f"node.{suffix}")
    return d


def role_tls(d: Path, role: str) -> TLSFiles:
    """The TLS files a process of ``role`` serves and dials with: its pair and the mesh CA."""
    return TLSFiles(str(d / f"{role}.pem"), str(d / f"{role}.key"), str(d / "ca.pem"))
