"""Weights in 2 MB pages: PyTorch's own switch, turned on for every moemesh process before torch loads.

A decode step streams every weight it uses once, and on CPU that stream is the step's bound (issue [P]).
Over 4 KB pages it costs a page walk every 4 KB; over transparent huge pages (THP), every 2 MB. PyTorch
(>= 2.2) aligns its CPU buffers of 2 MB or more to 2 MB and asks the kernel for huge pages
(``madvise(MADV_HUGEPAGE)``) when ``THP_MEM_ALLOC_ENABLE=1`` is in the environment when it first
allocates. With it the V2-Lite miniature's bf16 decode step at batch 16 measured 15.3-15.7 ms against
16.9-17.5 ms without (``moemesh bench --batch 16 --dtype bfloat16``, 2 threads, Xeon with AVX-512); fp32
steps moved within noise. The kernel needs THP in ``madvise`` or ``always`` mode
(/sys/kernel/mm/transparent_hugepage/enabled); under ``never`` the request is a no-op.

An operator's own ``THP_MEM_ALLOC_ENABLE`` (``0`` to opt out) is kept. Child processes (``moemesh up``'s
nodes) inherit the setting through the environment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

ENV = "THP_MEM_ALLOC_ENABLE"


def ask_for_huge_pages(environ: MutableMapping[str, str] = os.environ, loaded: frozenset[str] | None = None) -> bool:
    """Set PyTorch's THP switch unless the operator set it; True when it is on for this process.

    Only before torch is imported does it take effect (PyTorch reads it once, at its first allocation),
    so with torch already loaded this changes nothing and says whether the switch was on anyway.
    """
    loaded = frozenset(sys.modules) if loaded is None else loaded
    if "torch" not in loaded:
        environ.setdefault(ENV, "1")
    return environ.get(ENV) == "1"
