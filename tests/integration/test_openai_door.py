"""The router's OpenAI-compatible HTTP door end to end: `moemesh up --http-port 0` (real etcd, router, attention
and expert processes on a tiny checkpoint), the official `openai` client, curl, and the gRPC SDK side by side.

One mesh for the module, with client tokens and per-client limits of 1 running / 0 queued, so 401 and 429
are reachable; every test leaves nothing running (the disconnect tests check that the node freed its cache).
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading

import httpx2 as httpx  # the openai client's HTTP library
import openai
import pytest

from moemesh.launch.procs import terminate
from moemesh.model.chat_template import ChatTemplate
from moemesh.model.tiny import write_tiny_checkpoint
from moemesh.router import MeshClient
from tests.helpers import DEADLINE_S, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TOKEN_A, TOKEN_B = "door-client-a", "door-client-b"
PROMPT = "hello world, this is"
LONG = 1500  # tokens: far more than a test waits for (the context is 2048)
# A multi-turn conversation with a system message, for the checkpoint's own (DeepSeek-V3-style) template.
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "why is the sun warm?"}]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("door")
    model = write_tiny_checkpoint(root / "m", hidden_size=64, layers=2, experts=4, experts_per_token=2,
                                  chat_template="deepseek-v3")  # chat uses the checkpoint's own template
    (root / "tokens").write_text(f"{TOKEN_A}\n{TOKEN_B}\n")
    logs = root / "logs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moemesh.cli", "up", "--model", str(model), "--port", "0", "--http-port", "0",
         "--log-dir", str(logs), "--auth-token-file", str(root / "tokens"), "--max-running-per-client", "1",
         "--max-queued-per-client", "0", "--expert-nodes", "1",
         "--served-model-name", "tiny-door"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    ready, _, _ = select.select([proc.stdout], [], [], 240)
    assert ready, "moemesh up was not ready within 240 s"
    line = proc.stdout.readline()
    assert line, proc.stderr.read()[-3000:]
    info = json.loads(line)
    info["logs"] = logs
    info["model_name"] = "tiny-door"
    info["model_dir"] = model
    yield info
    terminate(proc, 60)


@pytest.fixture(scope="module")
def client(mesh):
    return openai.OpenAI(base_url=mesh["http"], api_key=TOKEN_A, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def sdk(mesh):
    with MeshClient(mesh["router"], token=TOKEN_A, timeout_s=120) as c:
        yield c


def _attn(sdk) -> dict:
    return next(n for n in sdk.cluster_status()["nodes"] if n["role"] == "attn")


def _idle(sdk, cache_free: int) -> bool:
    node = _attn(sdk)
    return node["running"] == 0 and node["waiting"] == 0 and node["cache_free"] == cache_free


def _router_events(mesh, request_id: str) -> list[str]:
    lines = (mesh["logs"] / "router.log").read_text().splitlines()
    return [e["event"] for e in map(json.loads, filter(lambda x: x.startswith("{"), lines))
            if e.get("request_id") == request_id]


def test_models_lists_the_served_model(client, mesh):
    assert mesh["http"].startswith("http://127.0.0.1:") and mesh["http"].endswith("/v1")
    assert [m.id for m in client.models.list().data] == [mesh["model_name"]]


def test_completion_equals_the_grpc_sdk_greedy(client, sdk, mesh):
    want = sdk.generate(PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True)
    got = client.completions.create(model=mesh["model_name"], prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.id.startswith("cmpl-") and got.object == "text_completion"
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.usage.prompt_tokens, 12)
    assert got.usage.total_tokens == got.usage.prompt_tokens + 12
    ids = sdk.tokenize(PROMPT)  # token-id prompt: the same tokens
    by_ids = client.completions.create(model=mesh["model_name"], prompt=ids, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == want.text


def test_streamed_completion_with_usage_equals_the_whole(client, mesh):
    whole = client.completions.create(model=mesh["model_name"], prompt=PROMPT, max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=mesh["model_name"], prompt=PROMPT, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_stop_string_ends_with_finish_reason_stop(client, sdk, mesh):
    text = sdk.generate(PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True).text
    stop = text[4:6]
    assert stop.strip(), f"pick another prompt: {text!r}"
    got = client.completions.create(model=mesh["model_name"], prompt=PROMPT, max_tokens=12, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True})
    assert got.choices[0].finish_reason == "stop" and got.choices[0].text == text[:text.index(stop)]


def _hf_chat_ids(model_dir, messages) -> list[int]:
    """transformers' own tokens for the conversation (its apply_chat_template on the checkpoint's template)."""
    from transformers import AutoTokenizer

    out = AutoTokenizer.from_pretrained(str(model_dir)).apply_chat_template(messages, add_generation_prompt=True,
                                                                           tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_chat_on_the_models_own_template_equals_the_sdk_on_transformers_tokens(client, sdk, mesh):
    want_ids = _hf_chat_ids(mesh["model_dir"], CONVERSATION)
    rendered = ChatTemplate.from_dir(mesh["model_dir"]).render(CONVERSATION)
    assert rendered.startswith("<s>be brief<｜User｜>hi there<｜Assistant｜>hello</s>")
    assert sdk.tokenize(rendered)[1:] == want_ids  # the door's text is transformers' tokens (tokenize adds a BOS)
    want = sdk.generate(prompt_ids=want_ids, max_tokens=8, temperature=0.0, ignore_eos=True)
    got = client.chat.completions.create(model=mesh["model_name"], messages=CONVERSATION, max_completion_tokens=8,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert got.id.startswith("chatcmpl-") and got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text and got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(want_ids) and got.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model=mesh["model_name"], messages=CONVERSATION, max_tokens=8,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.prompt_tokens == len(want_ids) and chunks[-1].usage.total_tokens == len(want_ids) + 8


def _chat_entries(client, mesh, stream: bool):
    kwargs = dict(model=mesh["model_name"], messages=CONVERSATION, max_tokens=6, temperature=0, logprobs=True,
                  top_logprobs=3, extra_body={"ignore_eos": True})
    if not stream:
        return client.chat.completions.create(**kwargs).choices[0].logprobs.content
    chunks = client.chat.completions.create(stream=True, **kwargs)
    return [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]


def test_chat_logprobs_are_the_greedy_tokens_and_equal_the_sdks(client, sdk, mesh):
    want = sdk.generate(prompt_ids=_hf_chat_ids(mesh["model_dir"], CONVERSATION), max_tokens=6, temperature=0.0,
                        ignore_eos=True, logprobs=3)
    assert [lp.token_id for lp in want.logprobs] == want.token_ids
    for stream in (False, True):
        entries = _chat_entries(client, mesh, stream)
        assert [e.token for e in entries] == [lp.token for lp in want.logprobs], stream
        for e, lp in zip(entries, want.logprobs):
            assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
            assert e.logprob == e.top_logprobs[0].logprob == pytest.approx(lp.logprob, abs=1e-5)
            assert [t.logprob for t in e.top_logprobs] == pytest.approx([t.logprob for t in lp.top], abs=1e-5)
            assert e.bytes == list(e.token.encode())


def test_completion_logprobs_are_consistent_streamed_and_not(client, sdk, mesh):
    kwargs = dict(model=mesh["model_name"], prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0]
    lp = whole.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]  # cumulative over the tokens
    want = sdk.generate(PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    for token, logprob, top, sdk_lp in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, want.logprobs):
        assert top[token] == logprob == max(top.values())  # greedy: the top one is the token
        assert len(top) == len({t.token for t in sdk_lp.top})  # 2, or 1 when both show the same text
    # each token's own text (a token ending mid-character shows U+FFFD, so they need not join to the text)
    assert lp.tokens == [t.token for t in want.logprobs]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices]
    parts = [c.logprobs for c in chunks if c.logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [o for p in parts for o in p.text_offset] == lp.text_offset  # offsets run on across the chunks
    assert [t for p in parts for t in p.top_logprobs] == lp.top_logprobs


@pytest.mark.parametrize("fields, param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
])
def test_bad_chat_logprobs_are_400_naming_the_field(mesh, fields, param):
    body = {"messages": CONVERSATION, "max_tokens": 2, **fields}
    r = httpx.post(f"{mesh['http']}/chat/completions", headers={"Authorization": f"Bearer {TOKEN_A}"}, json=body,
                   timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


def test_request_id_is_honoured_and_returned(mesh):
    r = httpx.post(f"{mesh['http']}/completions", headers={"Authorization": f"Bearer {TOKEN_A}",
                                                           "x-request-id": "my-req-1"},
                   json={"prompt": PROMPT, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-req-1" and r.json()["id"] == "cmpl-my-req-1"
    assert "generate_done" in _router_events(mesh, "my-req-1")


@pytest.mark.parametrize("body, param", [
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "n": 2}, "n"),
    ({"prompt": PROMPT, "echo": True}, "echo"),
    ({"prompt": PROMPT, "logprobs": 21}, "logprobs"),
    ({"max_tokens": 3}, "prompt"),
])
def test_bad_fields_are_400_naming_the_field(mesh, body, param):
    r = httpx.post(f"{mesh['http']}/completions", headers={"Authorization": f"Bearer {TOKEN_A}"}, json=body,
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and param in error["message"]


def test_errors_in_openai_shape(client, mesh):
    with pytest.raises(openai.AuthenticationError) as no_key:
        openai.OpenAI(base_url=mesh["http"], api_key="wrong", max_retries=0).models.list()
    assert no_key.value.status_code == 401 and no_key.value.body["code"] == "invalid_api_key"
    r = httpx.get(f"{mesh['http']}/models", timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert "gpt-4" in unknown.value.message
    assert httpx.get(mesh["http"].removesuffix("/v1") + "/health", timeout=30).status_code == 200  # open


def test_over_the_client_limit_is_429(mesh, sdk):
    b = openai.OpenAI(base_url=mesh["http"], api_key=TOKEN_B, max_retries=0, timeout=120)
    cache_free = _attn(sdk)["cache_free"]
    stream = b.completions.create(prompt=PROMPT, max_tokens=LONG, temperature=0, stream=True, model=mesh["model_name"],
                                  extra_body={"ignore_eos": True})
    next(iter(stream))  # client B runs one (its limit)
    with pytest.raises(openai.RateLimitError) as over:
        b.completions.create(prompt=PROMPT, max_tokens=2, model=mesh["model_name"])
    assert "--max-queued-per-client" in over.value.message
    stream.close()
    eventually(lambda: _idle(sdk, cache_free), DEADLINE_S, "the dropped stream's cache freed")


def test_curl_shows_sse_lines_as_they_come_and_done_last(mesh):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 6, "stream": True, "temperature": 0})
    proc = subprocess.Popen(["curl", "-sN", f"{mesh['http']}/completions", "-H", f"Authorization: Bearer {TOKEN_A}",
                             "-H", "Content-Type: application/json", "-d", body], stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # read as they come
        if line.strip():
            lines.append(line.strip())
    proc.wait(60)
    assert len(lines) >= 3 and all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def _drop_after_first_token(open_stream) -> None:
    got_one = threading.Event()

    def run():
        with open_stream() as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    got_one.set()
                    return  # leaving the with closes the connection

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert got_one.wait(DEADLINE_S), "no token came"
    t.join(DEADLINE_S)


@pytest.mark.parametrize("stream", [True, False])
def test_http_client_that_goes_away_frees_the_nodes_cache(mesh, sdk, stream):
    cache_free = _attn(sdk)["cache_free"]
    rid = f"gone-http-{stream}"
    body = {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "stream": stream}
    headers = {"Authorization": f"Bearer {TOKEN_A}", "x-request-id": rid}
    if stream:
        _drop_after_first_token(lambda: httpx.stream("POST", f"{mesh['http']}/completions", json=body,
                                                     headers=headers, timeout=120))
    else:  # no token comes back before the end: drop the connection once the node runs it
        sock = _raw_post(mesh, body, headers)
        eventually(lambda: "generate_first_token" in _router_events(mesh, rid), DEADLINE_S, "the node generating")
        sock.close()  # the connection drops mid-request
    eventually(lambda: _idle(sdk, cache_free), DEADLINE_S, "the node stopped and freed the cache")
    events = _router_events(mesh, rid)
    assert "generate_first_token" in events and "generate_done" not in events  # cancelled, never finished


def _raw_post(mesh, body: dict, headers: dict) -> socket.socket:
    """A POST /v1/completions sent on a plain socket, its answer unread (closing the socket drops the client)."""
    host, port = mesh["http"].removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    data = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{head}"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_grpc_client_that_goes_away_frees_the_nodes_cache(mesh, sdk):
    cache_free = _attn(sdk)["cache_free"]
    rid = "gone-grpc"
    chunks = sdk.stream(PROMPT, max_tokens=LONG, temperature=0.0, ignore_eos=True, request_id=rid)
    next(chunks)
    chunks.close()  # leaving the stream early cancels the call
    eventually(lambda: _idle(sdk, cache_free), DEADLINE_S, "the node stopped and freed the cache")
    events = _router_events(mesh, rid)
    assert "generate_first_token" in events and "generate_done" not in events
