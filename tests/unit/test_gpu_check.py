"""scripts/gpu-check.sh here, on a machine without a GPU: it refuses in one line, and its dry run shows
every section's command; its Python helpers (scripts/gpu_parity.py, fp8_figures.py, gpu_nccl.py) run on
the CPU too, which checks their plumbing (the GPU figures themselves need a GPU machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
NO_CUDA = ("gpu-check: no CUDA device visible (torch.cuda.is_available() is False); "
           "run this on a GPU machine")


def _run(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "VENV"}
    full.update({"PYTHON": sys.executable, **env})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=full,
                          cwd=ROOT)


def test_syntax():
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert os.access(SCRIPT, os.X_OK), "scripts/gpu-check.sh must be executable"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the script would run")
def test_refuses_without_cuda_in_one_line(tmp_path):
    out = _run("--out", str(tmp_path / "run"))
    assert out.returncode == 2
    assert (out.stdout + out.stderr).splitlines() == [NO_CUDA]
    assert not (tmp_path / "run").exists(), "it refused after starting work"


def test_bad_venv_and_unknown_argument_are_one_line(tmp_path):
    out = _run(VENV=str(tmp_path / "nothing"))
    assert out.returncode == 2 and (out.stdout + out.stderr).splitlines() == [
        f"gpu-check: VENV={tmp_path / 'nothing'} has no bin/python"]
    out = _run("--frobnicate")
    assert out.returncode == 2 and len((out.stdout + out.stderr).splitlines()) == 1


def test_dry_run_prints_every_section_command(tmp_path):
    out = _run("--dry-run", "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    py = sys.executable
    model = f"{tmp_path}/run/work/tiny-v3"
    expected = {
        "0": f"$ {py} -m moemesh.cli tiny-checkpoint {model} --arch deepseek_v3",
        "a": f"$ {py} scripts/gpu_parity.py --device cuda",
        "b": f"$ {py} -m moemesh.kernels.bench",
        "c": f"$ {py} -m moemesh.cli bench --model {model} --device cuda --dtype bfloat16",
        "d": f"$ {py} -m moemesh.cli bench --mesh --model {model} --device cuda --dtype bfloat16",
        "e": f"$ {py} scripts/fp8_figures.py --model {model} --device cuda",
        "f": f"$ {py} scripts/gpu_nccl.py --model {model}",
    }
    for key, command in expected.items():
        assert f"=== [{key}] " in text, f"section {key} missing:\n{text}"
        assert command in text, f"section {key}: no {command!r} in\n{text}"
    assert "timeout" in text and "summary" in text
    summary = text.split("=== gpu-check summary", 1)[1]
    assert summary.count("dry-run") == len(expected)
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


def test_only_picks_sections(tmp_path):
    out = _run("--dry-run", "--only", "b", "--out", str(tmp_path))
    assert out.returncode == 0
    assert "=== [b] " in out.stdout and "=== [c] " not in out.stdout and "=== [0] " not in out.stdout
    out = _run("--dry-run", "--only=c", "--out", str(tmp_path))
    assert "=== [0] " in out.stdout and "=== [c] " in out.stdout and "=== [a] " not in out.stdout


def _script(name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.oracle
@pytest.mark.slow
def test_parity_script_on_cpu():
    out = _script("gpu_parity.py", "--device", "cpu", "--configs", "v3_noaux_groups_bias", "--new-tokens", "8")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fp32 greedy tokens   ok   3/3" in out.stdout and "bf16 prefill logits  ok" in out.stdout


@pytest.mark.slow
def test_fp8_script_dequant_on_cpu(tiny_checkpoint):
    model = tiny_checkpoint(arch="deepseek_v3", hidden_size=128, experts=8, experts_per_token=2)
    out = _script("fp8_figures.py", "--model", str(model), "--device", "cpu", "--dtype", "float32", "--modes",
                  "dequant", "--batch", "2", "--prompt-len", "4", "--new-tokens", "2", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    import json

    row = json.loads(out.stdout.splitlines()[-1])
    # 2 MoE layers x 8 experts x (gate, up, down) of [64, 128] in fp32, plus each layer's [8] int64 slot table
    assert row["mode"] == "dequant" and row["routed_expert_bytes"] == 2 * (8 * 3 * 64 * 128 * 4 + 8 * 8)
    assert row["peak_bytes"] is None and row["tokens_per_s"] > 0
