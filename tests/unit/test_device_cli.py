"""``--device`` on the attention side's commands: a device that is not here is one line, before anything loads or starts."""

from __future__ import annotations

import pytest
import torch

from moemesh.cli import up
from moemesh.cli.main import build_parser, main
from moemesh.model.tiny import write_tiny_checkpoint

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_checkpoint(path, arch="deepseek_v2", hidden_size=64, layers=2, experts=4, experts_per_token=2)
    return path


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt-ids", "1,2"],
    ["bench"],
    ["bench", "--mesh"],
    ["attn-node", "--expert-nodes", "127.0.0.1:1=all"],
    ["up", "--port", "0"],
])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_missing_cuda_device_is_one_line_and_a_failure(argv, device, tiny_dir, capsys, monkeypatch):
    started = []
    monkeypatch.setattr("moemesh.launch.etcd_server.EtcdServer.start", lambda self: started.append("etcd"))
    code = main([argv[0], "--model", str(tiny_dir), *argv[1:], "--device", device])
    err = capsys.readouterr().err
    assert code != 0 and started == []  # nothing loaded, nothing started
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"--device {device}" in lines[0] and "--device cpu" in lines[0]


def test_up_hands_its_device_setting_to_every_node():
    args = build_parser().parse_args(["up", "--device", "cpu", "--dtype", "bfloat16", "--fp8", "dequant"])
    assert up._device_args(args) == ["--device", "cpu", "--dtype", "bfloat16", "--fp8", "dequant"]
    for child in ("attn-node", "expert-node"):  # the children parse what up passes them
        parsed = build_parser().parse_args([child, "--model", "m", *up._device_args(args)])
        assert (parsed.device, parsed.dtype, parsed.fp8) == ("cpu", "bfloat16", "dequant")
