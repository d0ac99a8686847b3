"""Role processes started by ``moemesh up`` / ``bench --mesh`` end when their launcher dies, even by SIGKILL.

The launcher gives each child a pipe as stdin and never writes to it; the child reads it on a daemon thread
and, at end of file (the launcher is gone: the kernel closed the write end), sends itself SIGTERM, the same
graceful stop (drain, leave the mesh) a launcher's ``terminate`` asks for. Not ``PR_SET_PDEATHSIG``: it
fires when the *thread* that forked exits, and ``up`` starts expert nodes from its control handlers'
threads. Children run in their own session (a Ctrl-C at the terminal reaches only the launcher, which
stops them in order), so no process group signal would reach them either.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

ENV = "MOEMESH_EXIT_WITH_PARENT"  # set by the launcher in the child's environment; children do not pass it on


def child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child that must end with this process (give it ``stdin=subprocess.PIPE`` too)."""
    return {**env, ENV: "1"}


def exit_with_parent() -> bool:
    """In a child started with :func:`child_env`: SIGTERM ourselves when stdin reaches end of file."""
    if os.environ.pop(ENV, None) != "1":
        return False
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # no stdin at all
        return False
    threading.Thread(target=_wait_for_eof, args=(fd,), name="parent-watch", daemon=True).start()
    return True


def _wait_for_eof(fd: int) -> None:
    # os.read on the raw descriptor, not sys.stdin.buffer: a daemon thread blocked inside a buffered reader
    # holds its lock, and the interpreter aborts at exit when it cannot take it (SIGABRT on a clean stop).
    try:
        while os.read(fd, 4096):
            pass  # the launcher never writes: anything read is ignored
    except OSError:
        pass  # stdin closed under us: the launcher is gone all the same
    os.kill(os.getpid(), signal.SIGTERM)
