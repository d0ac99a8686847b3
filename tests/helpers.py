"""Test helpers shared by every folder: poll for an event instead of sleeping, and watch processes.

* :func:`eventually` / :func:`aeventually`: call a probe until it returns something truthy and return
  that; after a generous deadline fail with a message naming what was awaited and the last value seen.
  Deadlines bound a hang on a loaded 2-core CI box; they never time the thing under test.
* :func:`wait_stopped`: SIGSTOP is asynchronous (the kernel stops a process only once one of its threads
  is scheduled and takes the signal), so a test that wants "the process answers nothing now" waits here.
* :func:`thread_cpu_seconds`: per-thread CPU time, to see which thread of a child is busy.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from moemesh.control.records import NodeRecord

T = TypeVar("T")

# Polls bound hangs, they do not measure speed: generous, so a loaded 2-core box never trips them.
DEADLINE_S = 60.0


def _timeout_message(what: str, timeout_s: float, last: Any, error: BaseException | None) -> str:
    msg = f"not within {timeout_s:g} s: {what} (last value seen: {last!r})"
    if error is not None:
        msg += f"; the last probe raised {type(error).__name__}: {error}"
    return msg


def eventually(probe: Callable[[], T], timeout_s: float = DEADLINE_S, what: str = "",
               interval_s: float = 0.05, ignore: tuple[type[BaseException], ...] = ()) -> T:
    """``probe()`` until truthy; return that value. ``ignore``: exceptions that count as "not yet"."""
    what = what or getattr(probe, "__name__", repr(probe))
    deadline = time.monotonic() + timeout_s
    last, error = None, None
    while True:
        try:
            last, error = probe(), None
        except ignore as exc:
            last, error = None, exc
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(_timeout_message(what, timeout_s, last, error))
        time.sleep(interval_s)


async def aeventually(probe: Callable[[], Awaitable[T]], timeout_s: float = DEADLINE_S, what: str = "",
                      interval_s: float = 0.05, ignore: tuple[type[BaseException], ...] = ()) -> T:
    """:func:`eventually` for a coroutine probe (``await probe()`` until truthy)."""
    what = what or getattr(probe, "__name__", repr(probe))
    deadline = time.monotonic() + timeout_s
    last, error = None, None
    while True:
        try:
            last, error = await probe(), None
        except ignore as exc:
            last, error = None, exc
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(_timeout_message(what, timeout_s, last, error))
        await asyncio.sleep(interval_s)


def _thread_stats(pid: int) -> dict[int, list[str]]:
    """``/proc/PID/task/TID/stat`` fields after the command name, per thread (Linux only)."""
    out = {}
    task_dir = Path(f"/proc/{pid}/task")
    for tid in os.listdir(task_dir):
        try:
            text = (task_dir / tid / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = text.rsplit(")", 1)[1].split()
    return out


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each thread of ``pid``, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    return {tid: (int(f[11]) + int(f[12])) / tick for tid, f in _thread_stats(pid).items()}


def process_stopped(pid: int) -> bool:
    """True once every thread of ``pid`` is in the stopped state (``T``), as after SIGSTOP took effect."""
    states = [f[0] for f in _thread_stats(pid).values()]
    return bool(states) and all(s in ("T", "t") for s in states)


def wait_stopped(pid: int, timeout_s: float = DEADLINE_S) -> None:
    """Return once a SIGSTOPped process really is stopped (all threads ``T``)."""
    eventually(lambda: process_stopped(pid), timeout_s, f"process {pid} stopped after SIGSTOP")


def node_record(role: str, node_id: str, fields: dict):
    """A typed node record from its JSON fields (what a role registers), for registry tests."""
    return NodeRecord.from_json({**fields, "id": node_id, "role": role})


class BackgroundLoop:
    """An asyncio loop on its own thread: aio servers run there while the test uses sync clients."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro, timeout_s: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
