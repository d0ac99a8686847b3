"""The ``moemesh::`` torch custom ops that wrap each Triton launch, and the checks their fake impls share.

Every Triton launch is a ``torch.library.custom_op`` with a ``register_fake`` impl: under
``FakeTensorMode`` (and so under ``torch.compile`` tracing and the fake-CUDA tests on a CPU-only
build) torch dispatches to the fake impl, which checks the op's contract (shapes, dtypes, one device)
and returns correctly shaped empty outputs on the inputs' device, while the real impl launches the
kernel. The torch glue around a launch (output allocation where the caller owns it, routing layout,
tile choices) stays in the Python wrappers, outside the ops, so the fake mode exercises it too.

Op arguments are tensors, ints, floats and bools only: constexpr choices travel as ints/bools and each
real impl turns them into Triton constexprs. Defining an op again (a test re-importing a kernel module
for the other TRITON_INTERPRET mode) replaces its impls, so the newest module's kernels run.
"""

from __future__ import annotations

import torch

NAMESPACE = "moemesh"


def op_name(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def expect(ok: bool, op: str, message: str) -> None:
    """Raise the op's contract violation as a ValueError naming the op."""
    if not ok:
        raise ValueError(f"{NAMESPACE}::{op}: {message}")


def expect_one_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """All given tensors (None skipped) on one device; returns it."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    expect(len(set(devices.values())) == 1, op, f"all tensors must be on one device, got {devices}")
    return next(iter(devices.values()))
