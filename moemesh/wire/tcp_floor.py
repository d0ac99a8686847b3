"""The kernel's floor for a dispatch hop: a C ping-pong of the same bytes over loopback TCP (tcp_floor.c).

``moemesh bench --mesh`` prints it beside the hop and the Python echo, in the same run, so that "hop vs echo"
comes with the physical limit of the hop's own mode: two threads spinning on two cores is the floor of the
torch transport's tcp stream (both of its ends spin: p2p_native.c); blocking receives are the floor of a
blocking echo, which the scheduler runs on one core beside its client or, when it wakes it elsewhere, across
cores at the cost of an interrupt into a halted vCPU.

Built like the pair stream's C (moemesh/native/build.py) at first use and cached; :func:`floor_us` returns None
(and logs once) without a compiler.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

from moemesh.logs import get_logger
from moemesh.native.build import compile_library, compiler_version, find_compiler, library_path

log = get_logger("moemesh.wire.tcp_floor")

SOURCE = Path(__file__).with_name("tcp_floor.c")
FLAGS = ("-O2", "-shared", "-fPIC", "-std=c11", "-pthread")
ABI_VERSION = 2

_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def _build() -> ctypes.CDLL | None:
    cc = find_compiler()
    if cc is None:
        log.warning("tcp_floor_unavailable", reason="no C compiler (cc, gcc or clang) on PATH")
        return None
    path = library_path("tcp_floor", (SOURCE,), FLAGS, compiler_version(cc))
    err = compile_library(cc, FLAGS, (SOURCE,), path, timeout_s=120) if not path.exists() else None
    if err is None:
        try:
            lib = ctypes.CDLL(str(path))  # the GIL is released for the call: the echo thread needs no Python
            if lib.mm_tcp_floor_abi() == ABI_VERSION:
                lib.mm_tcp_floor.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,
                                             ctypes.c_int32, ctypes.POINTER(ctypes.c_double)]
                lib.mm_tcp_floor.restype = ctypes.c_int64
                return lib
            err = f"{path}: ABI {lib.mm_tcp_floor_abi()}, expected {ABI_VERSION}"
        except OSError as e:
            err = str(e)
    log.warning("tcp_floor_unavailable", reason=f"{cc} could not build {SOURCE.name}: {err}")
    return None


def _lib() -> ctypes.CDLL | None:
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _build()
        return _state["lib"]


def floor_us(nbytes: int, rounds: int, *, spin: bool, one_core: bool = False, warmup: int | None = None) -> float | None:
    """Median round trip (microseconds) of ``rounds`` C ping-pongs of ``nbytes`` over loopback TCP, both ends
    spinning (``spin``) or blocking, both on the caller's CPU (``one_core``) or where the scheduler puts them;
    None when the library cannot be built here. OSError if a socket call fails."""
    if nbytes < 1 or rounds < 1:
        raise ValueError(f"nbytes and rounds must be >= 1, got {nbytes} and {rounds}")
    lib = _lib()
    if lib is None:
        return None
    out = ctypes.c_double()
    rc = lib.mm_tcp_floor(nbytes, max(2, rounds // 10) if warmup is None else warmup, rounds, int(spin),
                          int(one_core), ctypes.byref(out))
    if rc < 0:
        raise OSError(-rc, f"the loopback ping-pong of {nbytes} bytes failed: {os.strerror(-rc)}")
    return out.value
