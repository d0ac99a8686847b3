"""Run CUDA code paths on this CPU-only machine: every tensor on a fake ``cuda`` device, every CPU tensor caught.

``torch._subclasses.fake_tensor.FakeTensorMode`` lets the CPU-only torch build create tensors on
``cuda`` (shapes, dtypes and devices propagate; no data exists). Inside it:

* a CPU tensor meeting a CUDA one raises ``FakeTensorDeviceMismatchError`` (a hard-coded device);
* ``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)`` raise ``DataDependentOutputException``, and ops
  whose output shape depends on the data (``nonzero``, ``bincount``, boolean-mask indexing) raise too:
  each is a host sync a GPU would stall on.

:class:`DeviceAudit`, a dispatch mode entered inside the fake mode, also records every op whose output is
a CPU tensor, so a test can assert that a step creates nothing on the CPU (``audit.cpu_ops == []``).
Host data turned into tensors (``torch.tensor(list, device=...)``, seen as ``aten.lift_fresh``) is an
upload, counted apart in ``audit.uploads``: the step's inputs, never its math.

A CPU-only torch registers no CUDA device guard, and Python-level indexing (``x[0]``, ``x[idx]``,
``x[..., :n]``) and ``torch.tensor(..., device="cuda")`` open one: "PyTorch is not linked with support for
cuda devices" even on fake tensors (``FakeTensorMode``'s own ``_ensureCUDADeviceGuardSet`` does not cover
them in torch 2.13). :func:`fake_cuda` therefore registers c10's ``FakeGuardImpl`` for CUDA once per process:
a 3-line C++ file compiled with g++ against torch's headers (about 2 s, cached beside torch's extension builds).

Usage (weights and inputs are built in the fake mode, the step alone is audited)::

    with fake_cuda() as fake:
        x = torch.randn(4, 8, device="cuda")
        with fake.audit() as audit:
            y = step(x)
    assert audit.cpu_ops == []
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CUDA = torch.device("cuda", 0)
_UPLOAD_OPS = {"aten.lift_fresh.default", "aten.lift_fresh_copy.default"}
# torch.tensor(...) under torch.inference_mode also detaches the fresh host tensor in place: part of the upload.
_PART_OF_UPLOAD = {"aten.detach_.default"}


class DeviceAudit(TorchDispatchMode):
    """Records ops that produce CPU tensors (``cpu_ops``) and uploads of host data (``uploads``)."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu_ops: list[tuple[str, tuple[int, ...]]] = []
        self.uploads: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) in _PART_OF_UPLOAD:
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                (self.uploads if str(func) in _UPLOAD_OPS else self.cpu_ops).append((str(func), tuple(t.shape)))
        return out


class FakeCuda:
    """The active fake mode; ``audit()`` watches one stretch of code (the step) inside it."""

    def __init__(self, mode: FakeTensorMode) -> None:
        self.mode = mode

    @contextlib.contextmanager
    def audit(self) -> Iterator[DeviceAudit]:
        with DeviceAudit() as audit:
            yield audit


_GUARD_SOURCE = """#include <c10/core/impl/FakeGuardImpl.h>
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
"""
_guard: ctypes.CDLL | None = None


def _register_fake_cuda_guard() -> None:
    """Give a CPU-only torch a CUDA device guard that does nothing (c10's FakeGuardImpl); once per process."""
    global _guard
    if _guard is not None or torch.cuda._is_compiled():
        return  # a CUDA build has its own guard
    torch_dir = Path(torch.__file__).parent
    key = hashlib.sha256(f"{torch.__version__} {sys.version} {_GUARD_SOURCE}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    lib = cache / f"moemesh_fake_cuda_guard_{key}.so"
    if not lib.is_file():
        cxx = shutil.which(os.environ.get("CXX", "g++"))
        if cxx is None:
            raise RuntimeError("fake_cuda needs a C++ compiler (g++) to give this CPU-only torch a CUDA device guard")
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, out = Path(tmp) / "guard.cpp", Path(tmp) / "guard.so"
            src.write_text(_GUARD_SOURCE)
            subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{torch_dir / 'include'}", str(src),
                            f"-L{torch_dir / 'lib'}", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(out)],
                           check=True, capture_output=True)
            os.replace(out, lib)  # atomic: a concurrent run sees the whole library or none
    _guard = ctypes.CDLL(str(lib))  # its static initializer registers the guard


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeCuda]:
    """Fake tensors, CUDA allowed on this build; real tensors met inside are an error, not a silent mix."""
    _register_fake_cuda_guard()
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        yield FakeCuda(mode)
