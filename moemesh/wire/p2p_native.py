"""The tcp stream's per-message loop in C (p2p_native.c): built once per machine, cached, loaded as a CPython
extension (p2p_ext.c) or, failing that, by ctypes.

A decode-sized dispatch hop is a few hundred bytes each way; in Python, framing, the staging buffer's
bookkeeping and the expert node's checks cost several times the two system calls a raw TCP echo of the
same bytes makes. The C file does that work per message (the wire and the frames are p2p_socket.py's and
p2p.py's, unchanged); :mod:`moemesh.wire.p2p_socket` calls it when it is here and keeps its own Python
path otherwise, the same bytes either way.

Built like the CPU expert kernels (moemesh/native/build.py): ``cc -O2 -shared -fPIC`` at first use, cached
under ``$MOEMESH_KERNEL_CACHE`` (default ``~/.cache/moemesh/cpu-kernels``) keyed by the source, the flags,
the compiler's version and the machine. No compiler, or a failed build: one log line and :func:`load`
returns None (the Python path). ``MOEMESH_P2P_NATIVE=0`` turns it off (the same fallback, for comparisons).

The same C as a CPython extension module (p2p_ext.c: METH_FASTCALL functions of the same names and arguments;
a ctypes call costs ~0.5-1.4 us of argument conversion, more than some of the calls themselves) is tried
first: built against this interpreter's headers and keyed on its version too. Without ``Python.h``, or with
``MOEMESH_P2P_EXT=0``, the ctypes library serves, with one log line.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import os
import struct
import threading
from pathlib import Path

from moemesh.logs import get_logger
from moemesh.native.build import (compile_library, compiler_version, find_compiler, library_path, python_include,
                                  python_key)

log = get_logger("moemesh.wire.p2p_native")

SOURCE = Path(__file__).with_name("p2p_native.c")
EXT_SOURCE = Path(__file__).with_name("p2p_ext.c")  # includes SOURCE
EXT_NAME = "moemesh_p2p_ext"  # its PyInit_ symbol
FLAGS = ("-O2", "-shared", "-fPIC", "-std=c11")
ABI_VERSION = 8
# the C side's codes (p2p_native.c), for the messages p2p_socket gives them
ERR_CLOSED, ERR_TIMEOUT, ERR_TOO_LONG, ERR_LARGE, ERR_OTHER, ERR_ARGS = (-100001, -100002, -100003, -100004, -100005,
                                                                   -100006)

# p2p_native.c's argument blocks, field by field, as p2p_socket.py writes them (BLOCK_*) (8 bytes each: no padding)
BLOCK_LIMIT_DEADLINE = struct.Struct("<qd")  # recv_args' first two fields: what changes per receive
BLOCK_RECV_FIXED = struct.Struct("<qqqqqdqq")  # fd, staging, cap, state, rcvtimeo, slack, len_out, spin (at byte 16)
BLOCK_SERVE_AT = 80  # serve_args' fields after recv_args': out, limits, itemsize, hosted, n_layers
BLOCK_SERVE_TABLES = struct.Struct("<qqqqq")
BLOCK_SEND_FIXED = struct.Struct("<qq")  # send_args: fd, scratch
BLOCK_SEND = struct.Struct("<5q8q")  # then ids, ids_size, w, x, x_bytes, head[8] (at byte 16)
BLOCK_REPLY = struct.Struct("<7q")  # reply_args after fd: y, y_bytes, prefix[5] (at byte 8)
BLOCK_REPLY_COUNT = struct.Struct("<4q")  # then ids, n, counts, n_experts (at byte 64): counted once sent
BLOCK_TAKE_FIXED = struct.Struct("<qq")  # take_args: the receive block, prefix_out
BLOCK_TAKE = struct.Struct("<qq")  # then out, out_bytes (at byte 16)

SPIN_US = 100.0  # how long a C receive spins before it blocks (p2p_native.c spin_recv says why)
PREEMPT_NS = 20_000  # a spin whose thread was off its CPU longer than this (and a quarter of it) was preempted
SPIN_FIELDS = ("max_ns", "skip", "backoff", "caught", "missed", "preempted", "preempt_ns")  # p2p_native.c spin_t


def spin_ns(spin_us: float | None = None) -> int:
    """The spin of a C receive in ns: ``spin_us``, else ``$MOEMESH_P2P_SPIN_US``, else :data:`SPIN_US`; 0 when this
    process may run on one CPU only (a spin there only keeps the peer from running)."""
    if spin_us is None:
        raw = os.environ.get("MOEMESH_P2P_SPIN_US")
        try:
            spin_us = SPIN_US if raw is None else float(raw)
        except ValueError:
            spin_us = -1.0
        if not spin_us >= 0:
            raise ValueError(f"MOEMESH_P2P_SPIN_US={raw!r}: microseconds >= 0 that a receive spins before it "
                             "blocks (0: block at once)")
    if len(os.sched_getaffinity(0)) < 2:
        return 0
    return int(spin_us * 1000)


_lock = threading.Lock()
_state: dict[str, object] = {}


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_double
    lib.mm_send_request.argtypes = [i32, p, p, p, i32, p, p, i64]
    lib.mm_send_reply.argtypes = [i32, p, p, i64]
    lib.mm_recv_large.argtypes = [i32, p, p, p, i64, f64, p, f64]
    lib.mm_check_rows.argtypes = [p, p, i64, p, i64]
    lib.mm_rows_with_work.argtypes = [p, i32, i64, i64]
    # one pointer: an argument costs ~1 us
    for fn in (lib.mm_recv, lib.mm_serve, lib.mm_send, lib.mm_reply, lib.mm_take):
        fn.argtypes = [p]
    for fn in (lib.mm_send_request, lib.mm_send_reply, lib.mm_recv_large, lib.mm_check_rows, lib.mm_rows_with_work,
               lib.mm_recv, lib.mm_serve, lib.mm_send, lib.mm_reply, lib.mm_take):
        fn.restype = i64


def _build_ext(cc: str, cc_version: str):
    """The extension module (p2p_ext.c), or None after one log line saying why not (the ctypes library then)."""
    if os.environ.get("MOEMESH_P2P_EXT", "1") == "0":
        log.warning("p2p_ext_off", reason="MOEMESH_P2P_EXT=0", fallback="the same C through ctypes (~1 us more per call)")
        return None
    include = python_include()
    if not (Path(include) / "Python.h").exists():
        log.warning("p2p_ext_unavailable", reason=f"no Python.h under {include} (install the python3-dev package)",
                    fallback="the same C through ctypes (~1 us more per call)")
        return None
    flags = (*FLAGS, f"-I{include}", f"-I{SOURCE.parent}")
    path = library_path(EXT_NAME, (EXT_SOURCE, SOURCE), flags, cc_version, *python_key())  # it #includes SOURCE
    err = compile_library(cc, flags, (EXT_SOURCE,), path, timeout_s=120) if not path.exists() else None
    if err is None:
        try:
            spec = importlib.util.spec_from_file_location(
                EXT_NAME, path, loader=importlib.machinery.ExtensionFileLoader(EXT_NAME, str(path)))
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            if mod.mm_p2p_abi() == ABI_VERSION:
                return mod
            err = f"{path}: ABI {mod.mm_p2p_abi()}, expected {ABI_VERSION}"
        except (ImportError, OSError) as e:
            err = str(e)
    log.warning("p2p_ext_unavailable", reason=f"{cc} could not build {EXT_SOURCE.name}: {err}",
                fallback="the same C through ctypes (~1 us more per call)")
    return None


def _build(ext: bool = True):
    if os.environ.get("MOEMESH_P2P_NATIVE", "1") == "0":
        log.warning("p2p_native_off", reason="MOEMESH_P2P_NATIVE=0", fallback="the Python frame loop (same bytes, slower)")
        return None
    cc = find_compiler()
    if cc is None:
        log.warning("p2p_native_unavailable", reason="no C compiler (cc, gcc or clang) on PATH",
                    fallback="the Python frame loop (same bytes, slower): install gcc for the C one")
        return None
    cc_version = compiler_version(cc)
    module = _build_ext(cc, cc_version) if ext else None
    if module is not None:
        return module
    path = library_path("p2p_native", (SOURCE,), FLAGS, cc_version)
    err = compile_library(cc, FLAGS, (SOURCE,), path, timeout_s=120) if not path.exists() else None
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


def load():
    """The C calls, built on first use (once per process): the extension module, else the ctypes library (the
    same functions); None when neither can be had (logged once)."""
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _build()
        return _state["lib"]  # type: ignore[return-value]


def load_ctypes() -> ctypes.CDLL | None:
    """The ctypes library only (what :func:`load` falls back to): for tests and comparisons of the two."""
    with _lock:
        if "ctypes" not in _state:
            _state["ctypes"] = _build(ext=False)
        return _state["ctypes"]  # type: ignore[return-value]


def reset() -> None:
    """Forget the loaded library (tests switch it off and on with MOEMESH_P2P_NATIVE)."""
    with _lock:
        _state.clear()
