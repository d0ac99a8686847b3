"""``moemesh expert-node``: the device is resolved before anything loads; what it resolves reaches the node."""

from __future__ import annotations

import pytest
import torch

import moemesh.expert_node.main as expert_main
import moemesh.expert_node.registered as expert_registered
from moemesh.cli.main import main
from moemesh.kernels import cpu_kernels
from moemesh.model.checkpoint import write_fp8_twin
from moemesh.model.tiny import write_tiny_checkpoint

pytestmark = pytest.mark.unit
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), arch="deepseek_v3", hidden_size=64, layers=2,
                                 experts=4, experts_per_token=2)


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.fixture
def no_serving(monkeypatch):
    """Record what would be served instead of serving it."""
    calls = []

    async def fake(*args, **kwargs):
        calls.append((args, kwargs))

    monkeypatch.setattr(expert_main, "serve", fake)
    monkeypatch.setattr(expert_registered, "serve_registered", fake)
    return calls


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
@pytest.mark.parametrize("shard", [["--experts", "all"], ["--etcd", "127.0.0.1:1"]])
def test_device_cuda_without_cuda_is_one_line(device, shard, tiny_dir, no_serving, capsys):
    code, err = _run(["expert-node", "--model", str(tiny_dir), *shard, "--device", device], capsys)
    assert code != 0 and no_serving == []
    assert len(err.strip().splitlines()) == 1, err
    assert f"--device {device}" in err and "use --device cpu" in err and "Traceback" not in err


def test_device_is_checked_before_the_model_is_read(tmp_path, no_serving, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    code, err = _run(["expert-node", "--model", str(tmp_path / "missing"), "--experts", "all", "--device", "cuda"],
                     capsys)
    assert code != 0 and "--device cuda" in err and "does not exist" not in err


# auto keeps FP8 on a CPU where the C kernels run it (kernels/cpu_fp8.py)
@pytest.mark.parametrize("fp8, keep", [("auto", cpu_kernels.available()), ("keep", True), ("dequant", False)])
def test_cpu_device_dtype_and_fp8_reach_the_node(fp8, keep, tiny_dir, tmp_path, no_serving, capsys):
    model = write_fp8_twin(tiny_dir, tmp_path / "fp8", block=(16, 16))
    code, err = _run(["expert-node", "--model", str(model), "--experts", "all", "--device", "cpu", "--fp8", fp8],
                     capsys)
    assert code == 0, err
    (args, kwargs), = no_serving
    assert args[4] == torch.float32  # --dtype auto on a CPU
    assert kwargs["device"] == torch.device("cpu") and kwargs["keep_fp8"] is keep
