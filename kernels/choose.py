"""The one rule for choosing a kernel or its plain-torch reference, once, at construction.

Triton kernels serve CUDA devices (or any device when forced: on CPU they then need
``TRITON_INTERPRET=1`` set before triton is imported, as the tests do); the references
serve everything else and are the oracle the kernels are tested against.
"""

from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(device: torch.device | str, force_triton: bool, chooser: str) -> bool:
    """Whether ``chooser`` (e.g. ``select_route``) should return its Triton kernel for ``device``."""
    device = torch.device(device)
    use = force_triton or device.type == "cuda"
    if use and not HAS_TRITON:
        raise RuntimeError(f"{chooser}: triton is not installed, so no kernel for {device}; pip install triton")
    return use
