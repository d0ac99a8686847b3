"""`moemesh up --transport torch`: the whole mesh with pair groups (gloo) under the rows; transformers' tokens."""

from __future__ import annotations

import asyncio
import json
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moemesh.control.etcd import Keys, Registry
from moemesh.router import MeshClient
from tests.oracle.hf_models import save_hf_model

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]


def _events(path: Path, name: str) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == name:
            out.append(event)
    return out


async def _expert_records(etcd: str) -> list[dict]:
    async with await Registry.connect(etcd) as reg:
        return list((await reg.list(Keys().nodes("expert"))).values())


def test_up_torch_gives_transformers_greedy_tokens(tmp_path):
    model, logs = tmp_path / "m", tmp_path / "logs"
    hf = save_hf_model("v3_noaux_groups_bias", model)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moemesh.cli", "up", "--model", str(model), "--port", "0", "--log-dir", str(logs),
         "--transport", "torch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 180)
        assert ready, "moemesh up was not ready within 180 s"
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        up = json.loads(line)

        records = asyncio.run(_expert_records(up["etcd"]))
        assert len(records) == 2 and all(r.get("torch_store") for r in records), records  # the rendezvous
        deadline = time.monotonic() + 60  # groups form in the background; rows use gRPC until then
        while time.monotonic() < deadline and len(_events(logs / "attn-0.log", "torch_pair_up")) < 2:
            time.sleep(0.2)
        assert len(_events(logs / "attn-0.log", "torch_pair_up")) == 2, (logs / "attn-0.log").read_text()[-3000:]

        prompts = [[5, 9, 33, 2], list(range(40, 53)), [7] * 3]
        with MeshClient(up["router"], timeout_s=120) as client:
            results = [client.generate(prompt_ids=p, max_tokens=12, temperature=0.0, ignore_eos=True) for p in prompts]
        for prompt, result in zip(prompts, results):
            with torch.no_grad():
                want = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=None,
                                   pad_token_id=0)[0, len(prompt):].tolist()
            assert result.token_ids == want
        assert not _events(logs / "attn-0.log", "torch_pair_failed")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0
    for log in logs.glob("*.log"):  # every role exits cleanly, groups torn down before the process ends
        assert "terminate called" not in log.read_text(), log.read_text()[-2000:]
    served = sum(e["messages"] for i in range(2) for e in _events(logs / f"expert-{i}.log", "torch_session_closed"))
    assert served > 0, "no dispatch message went over the torch transport"
