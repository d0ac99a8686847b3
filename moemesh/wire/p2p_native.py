"""The tcp stream's per-message loop in C (p2p_native.c): built once per machine, cached, loaded by ctypes.

A decode-sized dispatch hop is a few hundred bytes each way; in Python, framing, the staging buffer's
bookkeeping and the expert node's checks cost several times the two system calls a raw TCP echo of the
same bytes makes. The C file does that work per message (the wire and the frames are p2p_socket.py's and
p2p.py's, unchanged); :mod:`moemesh.wire.p2p_socket` calls it when it is here and keeps its own Python
path otherwise, the same bytes either way.

Built like the CPU expert kernels (kernels/cpu_kernels.py): ``cc -O2 -shared -fPIC`` at first use, cached
under ``$MOEMESH_KERNEL_CACHE`` (default ``~/.cache/moemesh/cpu-kernels``) keyed by the source, the flags,
the compiler's version and the machine. No compiler, or a failed build: one log line and :func:`load`
returns None (the Python path). ``MOEMESH_P2P_NATIVE=0`` turns it off (the same fallback, for comparisons).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from moemesh.logs import get_logger

log = get_logger("moemesh.wire.p2p_native")

SOURCE = Path(__file__).with_name("p2p_native.c")
FLAGS = ("-O2", "-shared", "-fPIC", "-std=c11")
ABI_VERSION = 4
# the C side's codes (p2p_native.c), for the messages p2p_socket gives them
ERR_CLOSED, ERR_TIMEOUT, ERR_TOO_LONG, ERR_LARGE, ERR_OTHER = -100001, -100002, -100003, -100004, -100005

_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
    home = os.environ.get("MOEMESH_KERNEL_CACHE")
    return Path(home) if home else Path.home() / ".cache" / "moemesh" / "cpu-kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _compile(cc: str, out: Path) -> str | None:
    """Build the library at ``out``; None on success, else why not."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
    except OSError as e:
        return f"cannot write the cache {out.parent}: {e}"
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            return (done.stderr or done.stdout).strip()[-400:] or f"exit status {done.returncode}"
        os.replace(tmp, out)  # atomic: a concurrent build or load never sees half a library
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_double
    lib.mm_send_request.argtypes = [i32, p, p, p, i32, p, p, i64]
    lib.mm_send_reply.argtypes = [i32, p, p, i64]
    lib.mm_recv_message.argtypes = [i32, p, i64, p, i64, f64, p, f64, p]
    lib.mm_recv_large.argtypes = [i32, p, p, p, i64, f64, p, f64]
    lib.mm_check_rows.argtypes = [p, p, i64, p, i64, p]
    lib.mm_serve_next.argtypes = [i32, p, i64, p, i64, f64, p, f64, p, p, p, p, p, i64]
    lib.mm_rows_with_work.argtypes = [p, i32, i64, i64]
    for fn in (lib.mm_recv, lib.mm_serve, lib.mm_send, lib.mm_reply):  # one pointer: an argument costs ~1 us
        fn.argtypes = [p]
    for fn in (lib.mm_send_request, lib.mm_send_reply, lib.mm_recv_message, lib.mm_recv_large, lib.mm_check_rows,
               lib.mm_serve_next, lib.mm_rows_with_work, lib.mm_recv, lib.mm_serve, lib.mm_send, lib.mm_reply):
        fn.restype = i64


def _build() -> ctypes.CDLL | None:
    if os.environ.get("MOEMESH_P2P_NATIVE", "1") == "0":
        log.warning("p2p_native_off", reason="MOEMESH_P2P_NATIVE=0", fallback="the Python frame loop (same bytes, slower)")
        return None
    cc = _compiler()
    if cc is None:
        log.warning("p2p_native_unavailable", reason="no C compiler (cc, gcc or clang) on PATH",
                    fallback="the Python frame loop (same bytes, slower): install gcc for the C one")
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split("\n", 1)[0]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, platform.machine()]).encode()).hexdigest()[:20]
    path = cache_dir() / f"p2p_native-{key}.so"
    err = _compile(cc, path) if not path.exists() else None
    if err is None:
        try:
            lib = ctypes.CDLL(str(path))  # CDLL: the GIL is released for every call (they block on the socket)
            if lib.mm_p2p_abi() == ABI_VERSION:
                _declare(lib)
                return lib
            err = f"{path}: ABI {lib.mm_p2p_abi()}, expected {ABI_VERSION}"
        except OSError as e:
            err = str(e)
    log.warning("p2p_native_unavailable", reason=f"{cc} could not build {SOURCE.name}: {err}",
                fallback="the Python frame loop (same bytes, slower)")
    return None


def load() -> ctypes.CDLL | None:
    """The library, built on first use (once per process); None when it cannot be had (logged once)."""
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _build()
        return _state["lib"]  # type: ignore[return-value]


def reset() -> None:
    """Forget the loaded library (tests switch it off and on with MOEMESH_P2P_NATIVE)."""
    with _lock:
        _state.clear()
