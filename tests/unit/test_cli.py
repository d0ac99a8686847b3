"""The CLI: bad arguments end in one line that says what is wrong and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moemesh.cli.main import build_parser, main
from moemesh.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_checkpoint(path, arch="deepseek_v2", hidden_size=64, layers=2, experts=4, experts_per_token=2)
    return path


@pytest.fixture(scope="module")
def not_deepseek(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    return path


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "--model", "/nonexistent/model", "--prompt-ids", "1,2"], "does not exist"),
        (["generate", "--model", "{llama}", "--prompt-ids", "1,2"], "model_type"),
        (["generate", "--model", "{tiny}", "--prompt-ids", "1,2", "--max-tokens", "-3"], "--max-tokens"),
        (["generate", "--model", "{tiny}", "--prompt-ids", "1,2,99999"], "outside the vocabulary"),
        (["generate", "--model", "{tiny}", "--prompt-ids", "1,2", "--temperature", "-0.5"], "--temperature"),
        (["generate", "--model", "{tiny}", "--prompt-ids", "1,x"], "token ids"),
        (["generate", "--model", "{tiny}", "--prompt-ids", "1", "--top-p", "0"], "--top-p"),
        (["generate", "--model", "{tiny}", "--prompt-ids", "1", "--logprobs", "21"], "--logprobs"),
        (["bench", "--model", "{tiny}", "--batch", "0"], "--batch"),
        (["tiny-checkpoint", "{out}", "--experts", "4", "--experts-per-token", "9"], "--experts-per-token"),
    ],
)
def test_bad_arguments_give_one_line(argv, needle, tiny_dir, not_deepseek, tmp_path, capsys):
    argv = [a.format(tiny=tiny_dir, llama=not_deepseek, out=tmp_path / "x") for a in argv]
    code, err = _run(argv, capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0]
    assert "Traceback" not in err


@pytest.mark.slow
def test_no_traceback_from_the_real_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "moemesh.cli", "generate", "--model", str(tmp_path / "missing"), "--prompt-ids", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_every_command_has_help():
    parser = build_parser()
    for name in ("tiny-checkpoint", "generate", "bench"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0


def test_generate_json_in_prompt_order(tiny_dir, capsys):
    code = main(["generate", "--model", str(tiny_dir), "--prompt", "The river", "--prompt-ids", "5,6,7",
                 "--max-tokens", "4", "--temperature", "0", "--json", "--ignore-eos"])
    assert code == 0
    objs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["index"] for o in objs] == [0, 1]
    assert objs[1]["prompt_ids"] == [5, 6, 7]
    assert all(len(o["token_ids"]) == 4 and isinstance(o["text"], str) for o in objs)


def test_generate_logprobs_in_json_and_after_the_text(tiny_dir, capsys):
    from moemesh.model.tokenizer import Tokenizer

    args = ["generate", "--model", str(tiny_dir), "--prompt", "The river", "--max-tokens", "3", "--temperature", "0",
            "--ignore-eos", "--logprobs", "2"]
    assert main([*args, "--json"]) == 0
    (obj,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tok = Tokenizer.from_dir(tiny_dir)
    assert [lp["token_id"] for lp in obj["logprobs"]] == obj["token_ids"]
    for lp in obj["logprobs"]:
        assert [t["token_id"] for t in lp["top"]][0] == lp["token_id"] and len(lp["top"]) == 2  # greedy: top-1
        assert lp["logprob"] == lp["top"][0]["logprob"] <= 0 and lp["top"][1]["logprob"] <= lp["logprob"]
        assert lp["token"] == tok.decode([lp["token_id"]], skip_special_tokens=False)
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[-3:]] == [str(t) for t in obj["token_ids"]]  # "[0] id 'token' lp ..."


def test_generate_streams_text(tiny_dir, capsys):
    code = main(["generate", "--model", str(tiny_dir), "--prompt", "The river", "--prompt", "One two",
                 "--max-tokens", "3", "--seed", "3"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("[0] The river") and "\n[1] One two" in out
