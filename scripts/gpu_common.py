"""What scripts/gpu_parity.py, fp8_figures.py and gpu_nccl.py share (run as ``python scripts/X.py``).

The launchers take the one device setting (``device=``, ``fp8=``, moemesh/devices.py); a checkout whose
launchers predate it can still run these scripts on the CPU (they then omit the keywords), and says so
in one line anywhere else.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests/oracle/hf_models.py, for gpu_parity.py


def device_kwargs(fn, device: str, fp8: str = "auto") -> dict:
    """``device=``/``fp8=`` for ``fn`` (build_local / build_remote) when it takes them."""
    params = inspect.signature(fn).parameters
    kw = {}
    if "device" in params:
        kw["device"] = device
    elif device != "cpu":
        raise SystemExit(f"{fn.__module__}.{fn.__name__} takes no device= in this checkout: it predates the GPU "
                         "work of issue 13, so it cannot run on --device " + device)
    if "fp8" in params:
        kw["fp8"] = fp8
    elif fp8 != "auto" and not (fp8 == "dequant" and device == "cpu"):  # the old launchers dequantize on CPU
        raise SystemExit(f"{fn.__module__}.{fn.__name__} takes no fp8= in this checkout (--fp8 {fp8} needs it)")
    return kw


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
