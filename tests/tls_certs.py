"""Test certificates made with the openssl CLI: a CA and leaf certificates it signs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SERVER = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
CLIENT = "extendedKeyUsage=clientAuth\n"


def openssl_certs(d: Path, leaves: dict[str, str]) -> Path:
    """ca.pem/ca.key, and per leaf STEM.pem/STEM.key signed by it (``leaves``: stem -> openssl extensions)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI to make test certificates")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *newkey, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=moemesh-test-ca")
    for serial, (stem, extensions) in enumerate(leaves.items(), start=1):
        (d / f"{stem}.ext").write_text(extensions)
        run("req", *newkey, "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", f"/CN=moemesh-test-{stem}")
        run("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", str(serial),
            "-days", "1", "-extfile", f"{stem}.ext", "-out", f"{stem}.pem")
    return d


def make_mesh_certs(d: Path) -> Path:
    """ca.pem; node.pem/key (serverAuth+clientAuth, SAN 127.0.0.1 and localhost); client.pem/key."""
    return openssl_certs(d, {"node": "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
                             "client": CLIENT})
