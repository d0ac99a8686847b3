"""--threads on expert-node, attn-node and up: torch's intra-op threads, set before anything loads; up hands it
to every node it starts; absent, torch's own choice stays (up: 1 per process, as before)."""

from __future__ import annotations

import pytest
import torch

from moemesh.cli import up
from moemesh.cli.main import build_parser, main

pytestmark = pytest.mark.unit


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("argv", [
    ["expert-node", "--experts", "all"],
    ["attn-node", "--expert-nodes", "127.0.0.1:1=all"],
])
def test_threads_are_set_before_the_model_loads(argv, tmp_path, restore_threads, capsys):
    torch.set_num_threads(1)
    missing = tmp_path / "no-model"  # the config read fails after the threads are set: nothing else starts
    assert main([argv[0], "--model", str(missing), *argv[1:], "--threads", "3"]) != 0
    assert torch.get_num_threads() == 3
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["expert-node", "attn-node"])
def test_without_threads_torch_keeps_its_choice(command, tmp_path, restore_threads):
    torch.set_num_threads(2)
    extra = ["--experts", "all"] if command == "expert-node" else ["--expert-nodes", "127.0.0.1:1=all"]
    main([command, "--model", str(tmp_path / "no-model"), *extra])
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("command", ["expert-node", "attn-node", "up"])
def test_threads_must_be_positive(command, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--model", "m", "--threads", "0"])
    assert exc.value.code == 2 and "--threads" in capsys.readouterr().err


def test_help_says_the_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["expert-node", "--help"])
    assert "what torch picks" in " ".join(capsys.readouterr().out.split())


def test_up_hands_threads_to_every_node():
    args = build_parser().parse_args(["up", "--device", "cpu", "--threads", "4"])
    assert up._device_args(args)[-2:] == ["--threads", "4"]
    for child in ("attn-node", "expert-node"):  # the children parse what up passes them
        assert build_parser().parse_args([child, "--model", "m", *up._device_args(args)]).threads == 4
    assert "--threads" not in up._device_args(build_parser().parse_args(["up"]))


def test_bench_serving_refuses_threads(capsys):
    assert main(["bench", "--serving", "--threads", "2"]) != 0
    assert "moemesh up --threads N" in capsys.readouterr().err
