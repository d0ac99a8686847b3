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
from torch.overrides import TorchFunctionMode
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


class _CudaIndexing(TorchFunctionMode):
    """Route the Python entry points that need a real CUDA device guard onto plain aten ops.

    On the CPU-only build, ``t[...]``, ``t[...] = v``, ``~t`` and ``t.copy_(s)`` on a fake CUDA tensor raise
    "PyTorch is not linked with support for cuda devices" in their Python bindings (before any op is
    dispatched), while the aten ops they stand for run fine. This mode translates them with the same
    semantics, so model code keeps its ordinary indexing; the ops below still go through the fake mode,
    its device checks and the audit.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            return _getitem(*args)
        if func is torch.Tensor.__setitem__:
            return _setitem(*args)
        if func is torch.Tensor.__invert__:
            return torch.ops.aten.bitwise_not.default(args[0])
        if func is torch.Tensor.copy_:
            return torch.ops.aten.copy_.default(*args, **kwargs)
        return func(*args, **kwargs)


def _basic_view(x: torch.Tensor, index) -> tuple[torch.Tensor, list]:
    """Apply ints, slices, None and Ellipsis as views; return the view and [(dim, tensor)] still to gather."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is Ellipsis for i in items):
        at = next(n for n, i in enumerate(items) if i is Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items[at : at + 1] = [slice(None)] * (x.dim() - used)
    dim, advanced = 0, []
    for item in items:
        if item is None:
            x = torch.ops.aten.unsqueeze.default(x, dim)
            dim += 1
        elif isinstance(item, bool):
            raise NotImplementedError("fake_cuda indexing: a bool index")
        elif isinstance(item, int):
            x = torch.ops.aten.select.int(x, dim, item)
        elif isinstance(item, slice):
            x = torch.ops.aten.slice.Tensor(x, dim, item.start, item.stop, item.step or 1)
            dim += 1
        elif isinstance(item, torch.Tensor):
            advanced.append((dim, item))
            dim += 1
        else:
            raise NotImplementedError(f"fake_cuda indexing: index of type {type(item).__name__}")
    return x, advanced


def _tensor_indices(x: torch.Tensor, advanced: list) -> list:
    indices = [None] * x.dim()
    for dim, t in advanced:
        indices[dim] = t
    while indices and indices[-1] is None:
        indices.pop()
    return indices


def _getitem(x: torch.Tensor, index):
    view, advanced = _basic_view(x, index)
    if not advanced:
        return torch.ops.aten.alias.default(view)
    return torch.ops.aten.index.Tensor(view, _tensor_indices(view, advanced))


def _setitem(x: torch.Tensor, index, value) -> None:
    view, advanced = _basic_view(x, index)
    if not isinstance(value, torch.Tensor):
        value = torch.ops.aten.full.default([], value, dtype=x.dtype, device=x.device)
    if advanced:
        torch.ops.aten.index_put_.default(view, _tensor_indices(view, advanced), value)
    else:
        torch.ops.aten.copy_.default(view, value)


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
    with FakeTensorMode(allow_non_fake_inputs=False) as mode, _CudaIndexing():
        yield FakeCuda(mode)
