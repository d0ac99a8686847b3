"""Node ids and advertised addresses, shared by the roles."""

from __future__ import annotations

import re
import socket


def default_node_id(role: str, port: int) -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "host"
    return f"{role}-{host}-{port}"


def advertise_address(host: str, port: int, advertise: str | None = None) -> str:
    """The address other nodes dial: --advertise-host if given, else the bind host (hostname for 0.0.0.0)."""
    if advertise:
        return f"{advertise}:{port}"
    if host in ("0.0.0.0", "::", ""):
        return f"{socket.gethostname()}:{port}"
    return f"{host}:{port}"
