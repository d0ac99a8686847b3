"""Shared helpers for the Triton kernel tests.

The tests run every kernel under Triton's CPU interpreter (TRITON_INTERPRET=1, set by each test module
before it imports a kernel). Run them with TRITON_INTERPRET=0 on a machine with CUDA to launch the
compiled kernels on the GPU instead.

Triton decides interpreted-or-compiled when `@triton.jit` runs, not at launch: for our kernels when the
kernel module is imported (`load_kernel_module` re-imports one built under the other setting), and for
triton's own @jit helpers (tl.sum, tl.max, tl.cdiv ...) when `triton` itself is first imported. So the
variable must be set before anything in the process imports triton (transformers' DeepSeek modeling
module does, and so will any model code that imports these kernels). Otherwise interpreted kernels fail
with "Cannot call @triton.jit'd outside of the scope of a kernel"; `kernel_device` turns that into a
clear test failure (collection still succeeds, so the rest of a suite runs).
"""

from __future__ import annotations

import importlib
import types

import pytest
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


def interpreting() -> bool:
    """Whether kernels built now run in the CPU interpreter (reads TRITON_INTERPRET)."""
    return bool(triton.knobs.runtime.interpret)


def load_kernel_module(name: str) -> types.ModuleType:
    """Import `name`, re-importing it if its kernels were built for the other TRITON_INTERPRET mode."""
    module = importlib.import_module(name)
    want = InterpretedFunction if interpreting() else JITFunction
    kernels = [v for v in vars(module).values() if isinstance(v, (InterpretedFunction, JITFunction))]
    if any(not isinstance(k, want) for k in kernels):
        module = importlib.reload(module)
    return module


def kernel_device() -> torch.device:
    """Where the Triton kernels run: CPU under the interpreter, else CUDA (skips the test without one)."""
    if not isinstance(triton.language.max, InterpretedFunction if interpreting() else JITFunction):
        pytest.fail(
            "triton was imported before TRITON_INTERPRET was set to its current value, so its own helpers "
            "(tl.max, tl.sum, ...) cannot run in this mode: set TRITON_INTERPRET=1 in the environment "
            "(`TRITON_INTERPRET=1 pytest ...`) or before anything imports triton (tests/conftest.py)",
            pytrace=False,
        )
    if interpreting():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is off and there is no CUDA device to compile Triton kernels for")
    return torch.device("cuda")


# (atol, rtol) for kernel output against the fp32 reference computed from the same inputs.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol)
