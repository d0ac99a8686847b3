"""`moemesh bench --serving`'s runner: the --http client path against a fake OpenAI door (in-process ASGI, no
socket), the transformers baseline's static batches, and the flag errors."""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from sse_starlette import EventSourceResponse

from moemesh.cli.bench_serving import _httpx, _plan, _run_target
from moemesh.cli.bench_serving_hf import run_baseline
from moemesh.cli.main import build_parser, main
from moemesh.cli.serving_workload import ServingRequest


def serving_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", "--serving", "--no-progress", *extra])


def fake_door(seen: list[dict]):
    """A stand-in for the router's OpenAI door: one SSE chunk per token (the second with empty text, as
    mid-character), a closing chunk with only the finish_reason, a usage chunk, [DONE]."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "tiny", "object": "model", "created": 0, "owned_by": "moemesh"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        seen.append({"body": body, "authorization": request.headers.get("authorization")})
        n = body["max_tokens"]

        def chunk(text, finish=None, usage=None, choices=True):
            return json.dumps({"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]
                               if choices else [], "usage": usage})

        async def events():
            for i in range(n):
                yield {"data": chunk("" if i == 1 else f"t{i}")}
            yield {"data": chunk("", "length")}
            yield {"data": chunk("", choices=False, usage={"prompt_tokens": len(body["prompt"]),
                                                           "completion_tokens": n, "total_tokens": 0})}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events())

    return app


def test_http_streams_completions_through_the_openai_client(tmp_path):
    seen: list[dict] = []
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    args = serving_args("--http", "http://door.test", "--vocab-size", "50", "--num-prompts", "3",
                        "--input-len", "uniform:2:5", "--output-len", "uniform:1:4", "--token-file", str(token))
    args.plan = _plan(args)
    transport = _httpx().ASGITransport(app=fake_door(seen))
    requests, records, duration = asyncio.run(_run_target(args, None, 50, http_transport=transport))
    assert [r.output_len for r in requests] == [r.output_tokens for r in records]  # the usage counts
    assert all(r.ok and r.error is None for r in records) and duration > 0
    for req, rec in zip(requests, records):
        # one chunk per token, the empty-text one included, the closing one not
        assert len(rec.chunk_s) == req.output_len and rec.send_s <= rec.chunk_s[0] <= rec.end_s
    assert len(seen) == 4  # the warm-up request first, then the three
    first = seen[1]["body"]
    assert first["prompt"] == list(requests[0].prompt_ids) and first["max_tokens"] == requests[0].output_len
    assert (first["model"], first["stream"], first["temperature"], first["ignore_eos"]) == ("tiny", True, 0, True)
    assert first["stream_options"] == {"include_usage": True}
    assert seen[1]["authorization"] == "Bearer s3cret"


@pytest.mark.slow  # transformers' generate on CPU: ~15 s
def test_the_baseline_runs_static_batches_in_arrival_order(tiny_checkpoint):
    import torch

    from moemesh.cli.bench import _load_hf

    model = tiny_checkpoint(arch="deepseek_v2", hidden_size=64, layers=2, experts=4, experts_per_token=2)
    hf = _load_hf(str(model), torch.float32, torch.device("cpu"))
    reqs = [ServingRequest(0, 0.0, (5, 6, 7), 3), ServingRequest(1, 0.0, (8, 9), 1),
            ServingRequest(2, 50.0, (10, 11, 12, 13), 2)]
    records, duration = run_baseline(hf, reqs, batch_size=2, device=torch.device("cpu"))
    assert [r.index for r in records] == [0, 1, 2]
    assert [r.output_tokens for r in records] == [3, 1, 2] and [len(r.chunk_s) for r in records] == [3, 1, 2]
    assert all(r.ok for r in records)
    assert [r.send_s for r in records] == [0.0, 0.0, 50.0]  # TTFT counts from arrival
    a, b, c = records
    assert a.chunk_s[0] == b.chunk_s[0]  # one batch: its first step is both requests' first token
    assert a.chunk_s == sorted(a.chunk_s) and b.end_s < a.end_s
    assert c.chunk_s[0] > 50.0 and duration > 50.0  # the second batch waits for its last arrival


@pytest.mark.parametrize("argv, needle", [
    (["--serving", "--input-len", "normal:3"], "--input-len: expected fixed:N or uniform:LO:HI"),
    (["--serving", "--rate", "0"], "--rate"),
    (["--serving", "--percentiles", "50,101"], "--percentiles"),
    (["--serving", "--goodput", "itl:3"], "--goodput"),
    (["--serving", "--http", "http://127.0.0.1:9"], "--vocab-size"),
    (["--serving", "--router", "127.0.0.1:9", "--baseline", "transformers"], "--baseline transformers needs --model"),
    (["--router", "127.0.0.1:9"], "add --serving"),
    (["--serving", "--mesh"], "--mesh and --serving"),
    (["--serving", "--router", "a:1", "--http", "http://b"], "not allowed with argument"),
    (["--serving", "--http", "http://127.0.0.1:9", "--vocab-size", "9", "--served-model", "m", "--num-prompts", "1"],
     "the first (warm-up) request failed"),
])
def test_bad_serving_flags_give_one_line(argv, needle, capsys):
    try:
        code = main(["bench", *argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert needle in err and "Traceback" not in err


def test_help_names_every_serving_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    out = capsys.readouterr().out
    for flag in ("--serving", "--router", "--http", "--num-prompts", "--rate", "--burstiness", "--max-concurrency",
                 "--input-len", "--output-len", "--lengths-file", "--percentiles", "--goodput", "--baseline",
                 "--baseline-batch", "--json", "--token-file", "--tls-ca", "--served-model", "--vocab-size"):
        assert flag in out, flag
