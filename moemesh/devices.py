"""The one device setting: ``--device auto|cpu|cuda|cuda:N``, ``--dtype auto`` and ``--fp8 auto|keep|dequant``.

Every role resolves these once, at start-up, and hands the resulting ``torch.device``
and dtype to what it builds (weights, the latent cache, the sampler, the expert shard,
the torch transport). Nothing below the CLI and the launchers asks torch which device
to use. A device that is not there is a :class:`DeviceUnavailableError` with a
message that says what to run instead; the CLI prints it as one line.
"""

from __future__ import annotations

import argparse
import re

import torch

from moemesh.errors import FailedPreconditionError

DEVICE_HELP = "auto (CUDA when available, else CPU) | cpu | cuda | cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
FP8_MODES = ("auto", "keep", "dequant")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceUnavailableError(FailedPreconditionError):
    """The device asked for is not on this machine (or this torch build cannot use it)."""


def device_arg(text: str) -> str:
    """argparse type for ``--device``: checks the form only; :func:`resolve_device` checks the machine."""
    if not _DEVICE_RE.match(text.strip()):
        raise argparse.ArgumentTypeError(f"expected {DEVICE_HELP}, got {text!r}")
    return text.strip()


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` = the current CUDA device when there is one, else CPU; ``cuda``/``cuda:N`` must exist."""
    spec = device_arg(spec)
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        raise DeviceUnavailableError(f"--device {spec}: {why}; use --device cpu (or auto)")
    index = int(spec.partition(":")[2] or torch.cuda.current_device())
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceUnavailableError(
            f"--device {spec}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def resolve_dtype(name: str, checkpoint_dtype: str, device: torch.device, cpu_kernels: bool = True) -> torch.dtype:
    """The dtype weights are kept in: ``auto`` = the checkpoint's (bf16 if it names none), on every device.

    On CUDA it is also the compute dtype. On CPU a bf16/fp16 choice stays half the bytes in memory while
    activations stay fp32 (:func:`compute_dtype`): the CPU kernels widen the weights in registers, so tokens
    equal an fp32 run on the same checkpoint. ``float32`` upcasts the weights at load (the old CPU default),
    and so does ``auto`` on CPU when the kernels could not be built (``cpu_kernels=False``: no C compiler),
    since plain torch would widen every weight on every call instead.
    """
    if name == "auto":
        if device.type == "cpu" and not cpu_kernels:
            return torch.float32
        return DTYPES.get(checkpoint_dtype, torch.bfloat16)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    return DTYPES[name]


def compute_dtype(weights: torch.dtype, device: torch.device | str) -> torch.dtype:
    """Activations, the latent cache and the expert wire: the weights' dtype on accelerators, fp32 on CPU.

    CPU bf16/fp16 arithmetic is slow in torch (no fast small-M paths) and lossy; fp32 activations over
    half-precision weights cost the same weight bytes, which is what bounds decode there.
    """
    return weights if torch.device(device).type != "cpu" else torch.float32


def keep_fp8(mode: str, device: torch.device, cpu_kernels: bool = False) -> bool:
    """Whether FP8 block-quantized routed experts stay e4m3 in memory: ``auto`` = where a kernel runs them,
    on CUDA (Triton) and on CPUs with the C kernels built (``cpu_kernels``: kernels/cpu_fp8.py, half of
    bf16's bytes at about its speed).

    ``keep`` on a CPU without the kernels works (the reference dequantizes per call, slowly); ``dequant``
    converts them to the weights' dtype once, at load.
    """
    if mode not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {', '.join(FP8_MODES)}, got {mode!r}")
    return mode == "keep" or (mode == "auto" and (device.type == "cuda" or (device.type == "cpu" and cpu_kernels)))
