"""The one device setting: parsing, resolution on a machine without CUDA, dtype and FP8 defaults."""

from __future__ import annotations

import argparse

import pytest
import torch

from moemesh.devices import (DeviceUnavailableError, compute_dtype, device_arg, keep_fp8, resolve_device,
                             resolve_dtype)

pytestmark = pytest.mark.unit

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("text", ["auto", "cpu", "cuda", "cuda:0", "cuda:7", " cuda:1 "])
def test_device_arg_accepts_the_documented_forms(text):
    assert device_arg(text) == text.strip()


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "CPU", "cuda:-1", "mps", ""])
def test_device_arg_rejects_other_forms_with_the_choices(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"auto .* cpu \| cuda \| cuda:N"):
        device_arg(text)


def test_auto_and_cpu_resolve_to_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_one_clear_line(monkeypatch, spec):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError) as err:
        resolve_device(spec)
    message = str(err.value)
    assert "\n" not in message and f"--device {spec}" in message and "--device cpu" in message


def test_cuda_index_past_the_visible_devices_names_the_range(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == CUDA
    assert resolve_device("auto") == CUDA
    with pytest.raises(DeviceUnavailableError, match=r"only 2 CUDA device\(s\) visible \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_dtype_auto_keeps_the_checkpoints_weights_and_computes_fp32_on_cpu():
    assert resolve_dtype("auto", "bfloat16", CUDA) == torch.bfloat16
    assert resolve_dtype("auto", "float16", CUDA) == torch.float16
    assert resolve_dtype("auto", "bfloat16", CPU) == torch.bfloat16  # half the memory of an fp32 copy
    assert resolve_dtype("auto", "float32", CPU) == torch.float32
    assert resolve_dtype("float32", "bfloat16", CPU) == torch.float32  # the old CPU default, on request
    assert resolve_dtype("float16", "bfloat16", CPU) == torch.float16
    assert compute_dtype(torch.bfloat16, CPU) == torch.float32
    assert compute_dtype(torch.float16, "cpu") == torch.float32
    assert compute_dtype(torch.bfloat16, CUDA) == torch.bfloat16
    assert compute_dtype(torch.float32, CUDA) == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of auto, float32"):
        resolve_dtype("int8", "bfloat16", CPU)


def test_dtype_auto_upcasts_on_cpu_without_the_cpu_kernels():
    """No C compiler: plain torch would widen every bf16 weight on every call, so auto keeps fp32 weights there."""
    assert resolve_dtype("auto", "bfloat16", CPU, cpu_kernels=False) == torch.float32
    assert resolve_dtype("auto", "bfloat16", CUDA, cpu_kernels=False) == torch.bfloat16
    assert resolve_dtype("bfloat16", "bfloat16", CPU, cpu_kernels=False) == torch.bfloat16  # asked for: kept


def test_fp8_auto_keeps_where_a_kernel_runs_it():
    assert keep_fp8("auto", CUDA) and not keep_fp8("auto", CPU)
    assert keep_fp8("auto", CPU, cpu_kernels=True) and keep_fp8("auto", CUDA, cpu_kernels=False)
    assert not keep_fp8("dequant", CPU, cpu_kernels=True)
    assert keep_fp8("keep", CPU) and not keep_fp8("dequant", CUDA)
    with pytest.raises(ValueError, match="fp8 must be one of auto, keep, dequant"):
        keep_fp8("yes", CPU)
