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

Usage (weights and inputs are built in the fake mode, the step alone is audited)::

    with fake_cuda() as fake:
        x = torch.randn(4, 8, device="cuda")
        with fake.audit() as audit:
            y = step(x)
    assert audit.cpu_ops == []
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CUDA = torch.device("cuda", 0)
_UPLOAD_OPS = {"aten.lift_fresh.default", "aten.lift_fresh_copy.default"}


class DeviceAudit(TorchDispatchMode):
    """Records ops that produce CPU tensors (``cpu_ops``) and uploads of host data (``uploads``)."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu_ops: list[tuple[str, tuple[int, ...]]] = []
        self.uploads: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
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


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeCuda]:
    """Fake tensors, CUDA allowed on this build; real tensors met inside are an error, not a silent mix."""
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        yield FakeCuda(mode)
