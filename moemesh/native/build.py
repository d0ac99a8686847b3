"""Small C libraries built with the machine's compiler at first use and cached: the CPU kernels
(kernels/cpu_kernels.py) and the tcp stream's frame loop (moemesh/wire/p2p_native.py).

The cache is ``$MOEMESH_KERNEL_CACHE`` (default ``~/.cache/moemesh/cpu-kernels``), each library keyed by
everything its machine code depends on (source, flags, compiler version, machine: :func:`library_path`), so a
changed source or compiler builds anew and nothing stale is loaded. The callers fall back to Python or torch,
with one log line, when :func:`find_compiler` finds none or :func:`compile_library` says why it could not.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path


def cache_dir() -> Path:
    home = os.environ.get("MOEMESH_KERNEL_CACHE")
    return Path(home) if home else Path.home() / ".cache" / "moemesh" / "cpu-kernels"


def find_compiler() -> str | None:
    """``$CC``, ``cc``, ``gcc`` or ``clang``: the first on PATH, or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def compiler_version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split("\n", 1)[0]


def library_path(stem: str, files: Sequence[Path], flags: tuple[str, ...], cc_version: str, *extra: str) -> Path:
    """Where a library built from ``files`` (every file the build reads: its sources and the headers they
    include) with ``flags`` is cached: ``stem-<hash of all that>.so``; an edit to any of them builds anew."""
    key = hashlib.sha256("\0".join([*(f.read_text() for f in files), *flags, cc_version, *extra, platform.machine()])
                         .encode()).hexdigest()[:20]
    return cache_dir() / f"{stem}-{key}.so"


def compile_library(cc: str, flags: tuple[str, ...], sources: Sequence[Path], out: Path,
                    timeout_s: float) -> str | None:
    """Build ``sources`` (the C files, compiled and linked together) into ``out``; None on success, else why not
    (the compiler's last lines)."""
    try:  # an unwritable cache directory is one more reason to fall back, not an error in every call
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
    except OSError as e:
        return f"cannot write the cache {out.parent}: {e}"
    try:
        done = subprocess.run([cc, *flags, *map(str, sources), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=timeout_s)
        if done.returncode != 0:
            return (done.stderr or done.stdout).strip()[-400:] or f"exit status {done.returncode}"
        os.replace(tmp, out)  # atomic: a concurrent build or load never sees half a library
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def python_include() -> str:
    """Where this interpreter's ``Python.h`` is (a CPython extension builds against it)."""
    return sysconfig.get_paths()["include"]


def python_key() -> tuple[str, ...]:
    """What a CPython extension's machine code depends on beyond its source and flags: the interpreter's version
    and ABI and its headers (for :func:`library_path`'s ``extra``: another Python builds its own)."""
    return (sys.version, sysconfig.get_config_var("SOABI") or "", python_include())
