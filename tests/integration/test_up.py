"""`moemesh up` end to end: real etcd, router, attention and expert node processes; the SDK as the client."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch

from moemesh.router import MeshClient, MeshError
from moemesh.sampling import SamplingParams
from tests.oracle.hf_models import save_hf_model

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]


def _start_up(model_dir, log_dir, *extra):
    proc = subprocess.Popen(
        [sys.executable, "-m", "moemesh.cli", "up", "--model", str(model_dir), "--port", "0", "--log-dir",
         str(log_dir), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 180)
    assert ready, "moemesh up was not ready within 180 s"
    line = proc.stdout.readline()
    assert line, proc.stderr.read()[-3000:]
    return proc, json.loads(line)


def _descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3")
    hf = save_hf_model("v3_noaux_groups_bias", path)
    proc, ready = _start_up(path, tmp_path_factory.mktemp("logs"))
    yield hf, proc, ready
    if proc.poll() is None:
        proc.kill()


def test_sdk_tokens_equal_transformers_for_concurrent_requests(mesh):
    hf, _, ready = mesh
    prompts = [[5, 9, 33, 2], list(range(40, 53)), [7] * 3]
    with MeshClient(ready["router"], timeout_s=120) as client:
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda p: client.generate(prompt_ids=p, max_tokens=16, temperature=0.0,
                                                              ignore_eos=True), prompts))
        streamed = [t for chunk in client.stream(prompt_ids=prompts[1], max_tokens=16, temperature=0.0,
                                                 ignore_eos=True) for t in chunk.token_ids]
    for prompt, result in zip(prompts, results):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
        assert result.token_ids == want and result.finish_reason == "length"
    assert streamed == results[1].token_ids


def test_status_lists_every_node_and_the_placement(mesh):
    _, _, ready = mesh
    with MeshClient(ready["router"], timeout_s=120) as client:
        client.generate(prompt_ids=[3, 1, 4, 1, 5], max_tokens=4, temperature=0.0, ignore_eos=True)
        status = client.cluster_status()
    roles = sorted(n["role"] for n in status["nodes"])
    assert roles == ["attn", "expert", "expert"] and status["placement_version"] >= 1
    assert all(n["status"] == "ready" for n in status["nodes"])
    for node in status["nodes"]:  # the attention node's hops to each expert node, over its last window
        if node["role"] == "expert":
            assert int(node["hop_samples"]) > 0 and 0 < node["compute_p50_us"] < node["hop_p50_us"], node
            assert node["hop_p50_us"] <= node["hop_p99_us"], node


def test_invalid_request_is_invalid_argument_and_the_router_stays_up(mesh):
    _, _, ready = mesh
    with MeshClient(ready["router"]) as client:
        with pytest.raises(ValueError, match="top_p"):  # the SDK checks the sampling fields before sending
            client.generate(prompt_ids=[1, 2], max_tokens=16, top_p=1.5)
        with pytest.raises(MeshError) as exc:  # params= is sent as given: the router checks it again
            client.generate(prompt_ids=[1, 2], params=SamplingParams(max_tokens=16, top_p=1.5))
        assert exc.value.status == "INVALID_ARGUMENT" and "top_p" in exc.value.details
        assert client.generate(prompt_ids=[1, 2], max_tokens=2, temperature=0.0).token_ids


def test_request_id_reaches_the_attention_node_logs(mesh):
    _, _, ready = mesh
    with MeshClient(ready["router"]) as client:
        client.generate(prompt_ids=[4, 4, 4], max_tokens=2, request_id="trace-me-42")
    log = (Path(ready["logs"]) / "attn-0.log").read_text()
    lines = [json.loads(line) for line in log.splitlines() if "trace-me-42" in line]
    assert any(e.get("event") == "request_finished" and e.get("request_id") == "trace-me-42" for e in lines), log[-2000:]


def test_sdk_logprobs_through_router_attention_and_expert_nodes(mesh):
    hf, _, ready = mesh
    prompt = [5, 9, 33, 2, 17]
    with MeshClient(ready["router"], timeout_s=120) as client:
        chunks = list(client.stream(prompt_ids=prompt, max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3))
        with pytest.raises(MeshError) as exc:  # params= is sent as given: the router checks the range
            client.generate(prompt_ids=prompt, params=SamplingParams(max_tokens=2, logprobs=21))
        plain = client.generate(prompt_ids=prompt, max_tokens=2, temperature=0.0)
    assert exc.value.status == "INVALID_ARGUMENT" and "sampling.logprobs" in exc.value.details
    assert plain.logprobs is None
    tokens = [t for c in chunks for t in c.token_ids]
    records = [lp for c in chunks for lp in c.logprobs]
    assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
    assert [lp.token_id for lp in records] == tokens and len(tokens) == 6
    with torch.no_grad():  # the model's own log-softmax at each generated position
        ref = torch.log_softmax(hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float(), -1)
    for i, lp in enumerate(records):
        assert len(lp.top) == 3 and lp.top[0].token_id == lp.token_id  # greedy: the top alternative
        assert lp.top[0].logprob == lp.logprob
        assert lp.logprob == pytest.approx(ref[i, lp.token_id].item(), abs=1e-4)
        assert [t.token_id for t in lp.top] == torch.topk(ref[i], 3).indices.tolist()
        assert lp.token == "" and all(t.token == "" for t in lp.top)  # transformers' checkpoint: no tokenizer


def test_sigterm_stops_everything(mesh):
    _, proc, _ = mesh
    children = _descendants(proc.pid)
    assert len(children) >= 4  # etcd, router, 1 attention node, 2 expert nodes (and their helpers)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(psutil.pid_exists(pid) and psutil.Process(pid).status() !=
                                              psutil.STATUS_ZOMBIE for pid in children):
        time.sleep(0.2)
    alive = [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {alive}"


def test_tls_mesh_with_auth_serves_only_authenticated_tls_clients(tmp_path):
    from tests.tls_certs import mesh_certs

    certs = mesh_certs(tmp_path / "certs")
    (tmp_path / "token").write_text("s3cret\n")
    model = tmp_path / "m"
    save_hf_model("v2_group_limited_lora", model)
    proc, ready = _start_up(model, tmp_path / "logs", "--tls", str(certs), "--auth-token-file", str(tmp_path / "token"))
    try:
        tls = dict(ca_file=str(certs / "ca.pem"), cert_file=str(certs / "client.pem"),
                   key_file=str(certs / "client.key"))
        with MeshClient(ready["router"], token="s3cret", **tls) as client:
            assert len(client.generate(prompt_ids=[3, 4, 5], max_tokens=4, temperature=0.0).token_ids) == 4
        with MeshClient(ready["router"], **tls) as client, pytest.raises(MeshError) as exc:
            client.generate(prompt_ids=[3, 4], max_tokens=2)
        assert exc.value.status == "UNAUTHENTICATED"
        with MeshClient(ready["router"], token="s3cret", timeout_s=5, retries=0) as client, \
                pytest.raises(MeshError) as exc:
            client.generate(prompt_ids=[3, 4], max_tokens=2)  # plaintext against a TLS port
        assert exc.value.status == "UNAVAILABLE"
        _check_etcd_refuses_anonymous_reads(ready, certs)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _check_etcd_refuses_anonymous_reads(ready, certs):
    """A TLS mesh's etcd: plaintext, certificate-less and anonymous clients are refused; the mesh's own
    certificate with the user and password file up wrote (0600, beside the logs' parent) reads."""
    import asyncio

    from moemesh.control.etcd import Registry, RegistryError, RegistryUnavailable
    from moemesh.control.etcd_credentials import EtcdCredentials

    assert ready["etcd_tls"] is True
    mesh_cert = dict(ca=str(certs / "ca.pem"), cert=str(certs / "etcd.pem"), key=str(certs / "etcd.key"))

    async def refused(credentials, error):
        with pytest.raises(error):
            reg = await Registry.connect(ready["etcd"], timeout_s=3.0, credentials=credentials)
            await reg.close()

    asyncio.run(refused(None, RegistryUnavailable))  # plaintext
    asyncio.run(refused(EtcdCredentials(ca=mesh_cert["ca"]), RegistryUnavailable))  # no client certificate
    asyncio.run(refused(EtcdCredentials(**mesh_cert), RegistryError))  # anonymous
    password_file = Path(ready["etcd_password_file"])
    assert password_file.stat().st_mode & 0o077 == 0  # the owner's alone
    creds = EtcdCredentials.from_flags(**mesh_cert, user="root", password_file=str(password_file))

    async def read_nodes():
        async with await Registry.connect(ready["etcd"], credentials=creds) as reg:
            return sorted(ev.record.role for ev in await reg.read_cluster() if getattr(ev, "record", None))

    assert asyncio.run(read_nodes()) == ["attn", "expert", "expert"]
    for log in Path(ready["logs"]).iterdir():
        assert creds.password not in log.read_text(errors="replace"), f"{log.name} holds the etcd password"
