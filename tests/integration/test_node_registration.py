"""Nodes join through etcd: real etcd, real expert and attention node processes, a placement in etcd."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from moemesh.attn_node.engine import EngineConfig
from moemesh.sampling import SamplingParams
from moemesh.control.etcd import Keys, Registry
from moemesh.launch.etcd_server import EtcdServer, free_port
from moemesh.launch.embedded import build_local
from moemesh.v1 import attention_pb2, attention_pb2_grpc, inference_pb2
from tests.helpers import DEADLINE_S, aeventually

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]
KEYS = Keys("default")


def _spawn(args, log):
    return subprocess.Popen([sys.executable, "-m", "moemesh.cli", *args], stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True)


def _ready(proc) -> dict:
    line = proc.stdout.readline()
    assert line, f"process exited with {proc.poll()} before it was ready"
    return json.loads(line)


async def _with_registry(endpoint, fn):
    reg = await Registry.connect(endpoint)
    try:
        return await fn(reg)
    finally:
        await reg.close()


def _wait_keys(endpoint, prefix, count, timeout_s=DEADLINE_S):
    async def poll(reg):
        async def probe():
            keys = await reg.list(prefix)
            return keys if len(keys) == count else None
        return await aeventually(probe, timeout_s, f"{count} keys under {prefix}", interval_s=0.2)

    return asyncio.run(_with_registry(endpoint, poll))


def test_nodes_register_follow_the_placement_and_serve(tmp_path, tiny_checkpoint):
    model = tiny_checkpoint(arch="deepseek_v3", hidden_size=64, layers=3, experts=8,
                                  experts_per_token=2)
    with EtcdServer() as etcd:
        ep = etcd.endpoint
        metrics_port = free_port()
        procs = [_spawn(["expert-node", "--model", str(model), "--etcd", ep, "--node-id", f"e{i}"]
                        + (["--metrics-port", str(metrics_port)] if i == 0 else []),
                        tmp_path / f"e{i}.log") for i in range(2)]
        procs.append(_spawn(["attn-node", "--model", str(model), "--etcd", ep, "--node-id", "a0"],
                            tmp_path / "a0.log"))
        try:
            experts = _wait_keys(ep, KEYS.nodes("expert"), 2)
            assert all(r["status"] == "loading" for r in experts.values())
            layers = {str(layer): {str(e): ["e0" if e < 4 else "e1"] for e in range(8)} for layer in (1, 2)}
            placed = asyncio.run(_with_registry(
                ep, lambda reg: reg.put_if_version(KEYS.placement(), {"version": 1, "layers": layers}, 0)))
            assert placed
            assert [_ready(p)["node_id"] for p in procs] == ["e0", "e1", "a0"]
            records = _wait_keys(ep, KEYS.nodes(), 3)
            e0 = records[KEYS.node("expert", "e0")]
            assert e0["status"] == "ready" and e0["experts"] == {"1": [0, 1, 2, 3], "2": [0, 1, 2, 3]}
            assert records[KEYS.node("attn", "a0")]["status"] == "ready"

            port = int(records[KEYS.node("attn", "a0")]["address"].rsplit(":", 1)[1])
            stub = attention_pb2_grpc.AttentionNodeStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            req = inference_pb2.GenerateRequest(sampling=inference_pb2.SamplingParams(max_tokens=10, ignore_eos=True))
            req.token_ids.ids.extend([0, 7, 9, 30])
            got = [t for r in stub.Generate(req, timeout=60) for t in r.token_ids]
            local = build_local(model, "float32", EngineConfig(), progress=False)
            want = local.engine.generate([[0, 7, 9, 30]], SamplingParams(max_tokens=10, temperature=0.0,
                                                                          ignore_eos=True))[0].token_ids
            assert got == want
            load = stub.Load(attention_pb2.LoadRequest(), timeout=10)
            routed = {ll.layer: list(ll.tokens) for ll in load.expert_loads}
            assert sorted(routed) == [1, 2] and load.window_seconds > 0
            # every prompt and generated token that passed a MoE layer was routed to top-2 experts
            assert all(sum(tokens) == 2 * (4 + 10 - 1) for tokens in routed.values()), routed
            scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            assert 'moemesh_expert_tokens_total{expert="0",layer="1"}' in scraped
            assert 'moemesh_expert_messages_total{outcome="ok"}' in scraped

            # etcd goes away: nodes keep serving on what they know; when it is back, they are registered again.
            etcd.kill()
            assert [t for r in stub.Generate(req, timeout=60) for t in r.token_ids] == want
            etcd.restart()
            assert len(_wait_keys(ep, KEYS.nodes(), 3)) == 3
            assert [t for r in stub.Generate(req, timeout=60) for t in r.token_ids] == want

            procs[1].kill()  # SIGKILL: no deregistration; the lease (TTL 5 s) must drop the key
            t0 = time.monotonic()
            _wait_keys(ep, KEYS.nodes("expert"), 1)
            assert time.monotonic() - t0 < 12
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            codes = [p.wait(30) for p in procs]
    assert codes[0] == 0 and codes[2] == 0  # drained and exited cleanly on SIGTERM
