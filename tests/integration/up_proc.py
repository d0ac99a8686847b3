"""`moemesh up` as a test's subprocess: started, its ready line read, stopped with SIGTERM (killed if stuck)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
from collections.abc import Iterator, Sequence

from moemesh.launch.procs import terminate

READY_S = 240


@contextlib.contextmanager
def moemesh_up(args: Sequence[str]) -> Iterator[dict]:
    """Yields the ready line's JSON (router, http, etcd, ...) of ``moemesh up ARGS``."""
    proc = subprocess.Popen([sys.executable, "-m", "moemesh.cli", "up", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        ready, _, _ = select.select([proc.stdout], [], [], READY_S)
        assert ready, f"moemesh up was not ready within {READY_S} s"
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        yield json.loads(line)
    finally:
        terminate(proc, 60)
