"""Helpers for the fused-MoE and routing kernel tests.

The test modules set ``TRITON_INTERPRET=1`` (unless the variable is already set)
before importing a kernel, so the kernels run in Triton's CPU interpreter. With
``TRITON_INTERPRET=0`` on a CUDA machine the same tests launch compiled kernels.

Triton fixes interpreted-or-compiled when ``@triton.jit`` runs, i.e. when the
kernel module is imported. If something imported the module earlier in the
session under the other setting, :func:`kernel_module` re-imports it. Triton's
own helpers (``tl.max``, ``tl.argmax``...) are built when ``triton`` is first
imported, so the variable must be set before that: a process that imported
triton without it cannot interpret kernels, and :func:`kernel_device` fails the
test saying so (collection still succeeds, so the rest of a suite runs).
"""

from __future__ import annotations

import importlib
import types

import pytest
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# (atol, rtol) of a kernel against its torch reference on the same inputs.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def kernel_module(name: str) -> types.ModuleType:
    """Import ``name``; re-import it when its kernels were built for the other TRITON_INTERPRET mode."""
    module = importlib.import_module(name)
    want = InterpretedFunction if interpreting() else JITFunction
    built = [v for v in vars(module).values() if isinstance(v, (InterpretedFunction, JITFunction))]
    if any(not isinstance(k, want) for k in built):
        module = importlib.reload(module)
    return module


def kernel_device() -> torch.device:
    """CPU under the interpreter, else CUDA (skips the test when there is none)."""
    if not isinstance(triton.language.max, InterpretedFunction if interpreting() else JITFunction):
        pytest.fail(
            "triton was imported before TRITON_INTERPRET was set to its current value, so its own helpers "
            "(tl.max, ...) cannot run in this mode: set TRITON_INTERPRET=1 in the environment "
            "(e.g. `TRITON_INTERPRET=1 pytest ...`) or run the kernel tests in their own process",
            pytrace=False,
        )
    if interpreting():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is off and there is no CUDA device for compiled Triton kernels")
    return torch.device("cuda")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol)


def sort_by_expert(idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (ids, weights) ordered by expert id, so routings compare as sets."""
    ids, order = idx.cpu().sort(dim=1)
    return ids, weights.cpu().float().gather(1, order)
