"""``moemesh bench --serving``: online serving figures measured the way vLLM's benchmark_serving does.

Requests (seeded random prompt token ids, drawn lengths, EOS ignored so every output is as long as drawn)
are sent at their arrival times (moemesh/cli/serving_workload.py) and streamed; the client records when
each chunk arrives and moemesh/cli/serving_metrics.py turns that into TTFT, TPOT, ITL, E2EL and throughput.

Targets: ``--router HOST:PORT`` (the gRPC SDK, AsyncMeshClient), ``--http URL`` (the OpenAI-compatible door,
through the official ``openai`` client's streaming completions), or neither: an embedded mesh, ``moemesh
up`` started as processes on ``--model`` and stopped afterwards. ``--baseline transformers`` then runs the
same requests through transformers' ``generate`` (moemesh/cli/bench_serving_hf.py) and both are printed
side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moemesh.argtypes import positive_float, positive_int, seed
from moemesh.launch.procs import terminate

DEFAULT_NUM_PROMPTS = 32
SIDE = "moemesh"
BASELINE = "transformers"


def rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests/s (a number > 0) or inf, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 requests/s, or inf (all at once), got {text}")
    return value


def percentile_list(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        values = []
    if not values or not all(0 <= p <= 100 for p in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated percentiles in 0..100, e.g. 50,90,99, got {text!r}")
    return values


def add_serving_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serving", action="store_true",
                   help="instead: the online serving benchmark (vLLM's benchmark_serving figures: TTFT, TPOT, ITL, "
                   "E2EL, throughput) against --router, --http or an embedded mesh on --model; the flags below")
    g = p.add_argument_group("serving benchmark (--serving)")
    target = g.add_mutually_exclusive_group()
    target.add_argument("--router", metavar="HOST:PORT", help="a running router: stream through the gRPC SDK")
    target.add_argument("--http", metavar="URL", help="a running router's OpenAI-compatible door, e.g. "
                        "http://127.0.0.1:8000 (/v1 is added): streaming /v1/completions through the openai client")
    g.add_argument("--token-file", metavar="F", help="file holding the bearer token the router requires")
    g.add_argument("--tls-ca", metavar="F", help="CA certificate to verify the router (gRPC: turns TLS on; http: "
                   "for an https URL)")
    g.add_argument("--tls-cert", metavar="F", help="client certificate, for a router requiring mTLS")
    g.add_argument("--tls-key", metavar="F", help="client private key, for a router requiring mTLS")
    g.add_argument("--timeout", type=positive_float, default=600.0, metavar="S", help="seconds one request may take (default: 600)")
    g.add_argument("--served-model", metavar="NAME", help="--http: the model name to ask for (default: the first "
                   "of /v1/models)")
    g.add_argument("--vocab-size", type=positive_int, metavar="V", help="--http without --model: prompt token ids "
                   "are drawn from 2..V-1 (default: --model's config; --router asks the router)")
    g.add_argument("--attn-nodes", type=positive_int, default=1, metavar="N", help="embedded mesh: attention nodes (default: 1)")
    g.add_argument("--expert-nodes", type=positive_int, default=2, metavar="N", help="embedded mesh: expert nodes (default: 2)")
    g.add_argument("--num-prompts", type=positive_int, default=None, metavar="N",
                   help="requests sent (default: 32; with --lengths-file: one per line)")
    g.add_argument("--rate", type=rate, default=math.inf, metavar="R", help="requests/s of a Poisson process "
                   "(exponential gaps, seeded), or inf: all at t = 0 (default: inf)")
    g.add_argument("--burstiness", type=positive_float, default=1.0, metavar="B", help="gamma shape of the arrival gaps, "
                   "mean kept at 1/R: 1 = Poisson, < 1 burstier, > 1 more even (vLLM's; default: 1)")
    g.add_argument("--max-concurrency", type=positive_int, default=None, metavar="C",
                   help="requests in flight at most; later ones wait and their TTFT counts from when they are sent "
                   "(default: no limit; the baseline is bounded by --baseline-batch instead)")
    g.add_argument("--input-len", default="fixed:32", metavar="DIST",
                   help="prompt tokens: fixed:N or uniform:LO:HI (default: fixed:32)")
    g.add_argument("--output-len", default="fixed:32", metavar="DIST",
                   help="tokens generated per request, EOS ignored: fixed:N or uniform:LO:HI (default: fixed:32)")
    g.add_argument("--lengths-file", metavar="F", help='instead of --input-len/--output-len: a JSONL file of '
                   '{"prompt_len": P, "output_len": O} lines, one request each, in order')
    g.add_argument("--seed", type=seed, default=0, help="seeds arrivals, lengths and prompts (default: 0)")
    g.add_argument("--percentiles", type=percentile_list, default=[50.0, 90.0, 99.0], metavar="P,P",
                   help="percentiles reported for TTFT, TPOT, ITL and E2EL (default: 50,90,99)")
    g.add_argument("--goodput", nargs="+", metavar="METRIC:MS", help="SLOs for goodput (requests/s meeting all), "
                   "e.g. ttft:500 tpot:50; metrics ttft, tpot, e2el, in ms (default: not reported)")
    g.add_argument("--baseline", choices=[BASELINE], help="also run the same requests through transformers' "
                   "generate on --model, in arrival-ordered static batches, printed side by side")
    g.add_argument("--baseline-batch", type=positive_int, default=8, metavar="B",
                   help="requests per static batch of the baseline (default: 8)")
    g.add_argument("--ready-timeout", type=positive_float, default=300.0, metavar="S",
                   help="embedded mesh: seconds to wait for it to be ready (default: 300)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _plan(args) -> tuple[list[tuple[int, int]], list[float]]:
    """(prompt_len, output_len) and arrival time per request: checked before anything starts."""
    from moemesh.cli.serving_workload import LengthDist, WorkloadError, arrival_times, draw_lengths, \
        read_lengths_jsonl

    if args.lengths_file:
        pairs = read_lengths_jsonl(args.lengths_file)
        n = args.num_prompts or len(pairs)
        if n > len(pairs):
            raise WorkloadError(f"--lengths-file {args.lengths_file} has {len(pairs)} requests; --num-prompts {n} "
                                "asks for more")
        lengths = pairs[:n]
    else:
        n = args.num_prompts or DEFAULT_NUM_PROMPTS
        lengths = draw_lengths(n, LengthDist.parse(args.input_len, "--input-len"),
                               LengthDist.parse(args.output_len, "--output-len"), args.seed)
    return lengths, arrival_times(n, args.rate, args.burstiness, args.seed)


def _workload(args, vocab_size: int):
    from moemesh.cli.serving_workload import build_workload

    return build_workload(*args.plan, vocab_size, args.seed)


async def _drive(requests, stream, max_concurrency: int | None, progress: bool):
    """Send each request at its arrival time (or when a --max-concurrency slot frees), record its chunks."""
    from tqdm import tqdm

    from moemesh.cli.serving_metrics import RequestRecord

    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    bar = tqdm(total=len(requests), disable=not progress, desc="requests", file=sys.stderr)
    start = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - start

    async def one(req):
        await asyncio.sleep(max(0.0, req.arrival_s - now()))
        async with slots:
            rec = RequestRecord(req.index, req.prompt_len, req.output_len, send_s=now())

            def on_chunk(tokens: int) -> None:
                if tokens:
                    rec.chunk_s.append(now())
                    rec.output_tokens += tokens

            try:
                counted = await stream(req, on_chunk)
                rec.end_s = now()
                if counted is not None:  # the server's usage, where chunks do not say how many tokens they hold
                    rec.output_tokens = counted
                    del rec.chunk_s[max(counted, 1):]  # more chunks than tokens: the last closed the stream
            except Exception as exc:  # one failed request is a figure, not the end of the run
                rec.error = f"{type(exc).__name__}: {exc}"
        bar.update(1)
        return rec

    records = await asyncio.gather(*(one(r) for r in requests))
    duration = now()
    bar.close()
    return list(records), duration


def _grpc_stream(client):
    async def stream(req, on_chunk):
        async for chunk in client.stream(prompt_ids=list(req.prompt_ids), max_tokens=req.output_len,
                                         temperature=0.0, ignore_eos=True):
            on_chunk(len(chunk.token_ids))
        return None

    return stream


def _openai_client(args, transport=None):
    try:
        import openai
    except ImportError:
        from moemesh.errors import MoemeshError

        raise MoemeshError("--http streams through the openai client: pip install 'moemesh[bench]'") from None
    base = args.http.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    token = Path(args.token_file).read_text().strip() if args.token_file else "EMPTY"
    tls = True
    if args.tls_ca or args.tls_cert:
        import ssl

        tls = ssl.create_default_context(cafile=args.tls_ca)
        if args.tls_cert:
            tls.load_cert_chain(args.tls_cert, args.tls_key)
    # The client's own httpx (httpx or httpx2, by openai version), with room for every request at once: a
    # connection pool smaller than the load would queue requests in the client and inflate TTFT.
    limits = _httpx().Limits(max_connections=None, max_keepalive_connections=None)
    # transport: an ASGI app's, in the unit tests; else httpx's own.
    http = openai.DefaultAsyncHttpxClient(verify=tls, timeout=args.timeout, limits=limits, transport=transport)
    return openai.AsyncOpenAI(base_url=base, api_key=token, http_client=http, max_retries=0, timeout=args.timeout)


def _httpx():
    import importlib

    import openai

    return importlib.import_module(openai.DefaultAsyncHttpxClient.__mro__[1].__module__.partition(".")[0])


def _http_stream(client, model: str):
    async def stream(req, on_chunk):
        usage = None
        response = await client.completions.create(
            model=model, prompt=list(req.prompt_ids), max_tokens=req.output_len, stream=True, temperature=0,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in response:
            if chunk.choices:
                # A chunk per token (its text may be empty mid-character); a closing chunk that only carries
                # the finish_reason is dropped by the caller, which trims the chunks to the usage's count.
                on_chunk(1)
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        return usage

    return stream


async def _run_target(args, router: str | None, vocab_size: int | None, http_transport=None):
    """(requests, records, duration) against the gRPC router at ``router`` or ``--http``."""
    if router is not None:
        from moemesh.router import AsyncMeshClient

        async with AsyncMeshClient(router, token_file=args.token_file, tls=bool(args.tls_ca), ca_file=args.tls_ca,
                                   cert_file=args.tls_cert, key_file=args.tls_key, timeout_s=args.timeout) as client:
            requests = _workload(args, vocab_size or (await client.model_info()).vocab_size)
            stream = _grpc_stream(client)
            return requests, *(await _warm_and_drive(args, requests, stream))
    client = _openai_client(args, http_transport)
    try:
        model = args.served_model or (await client.models.list()).data[0].id
        requests = _workload(args, vocab_size)
        return requests, *(await _warm_and_drive(args, requests, _http_stream(client, model)))
    finally:
        await client.close()


async def _warm_and_drive(args, requests, stream):
    # One request first, as vLLM's "initial test run": it fails loudly on a wrong target, and the first
    # call's one-time costs (connections, kernel choices) stay out of the figures.
    try:
        await stream(requests[0], lambda tokens: None)
    except Exception as exc:
        from moemesh.errors import MoemeshError

        raise MoemeshError(f"the first (warm-up) request failed, check the target and flags: "
                           f"{type(exc).__name__}: {exc}") from None
    return await _drive(requests, stream, args.max_concurrency, progress=not args.no_progress)


@contextlib.contextmanager
def embedded_mesh(args, model: str):
    """``moemesh up`` on ``model`` as processes (etcd, router, attention and expert nodes); yields the
    router's address and stops everything on the way out."""
    from moemesh.errors import MoemeshError

    logs = tempfile.mkdtemp(prefix="moemesh-bench-serving-")
    cmd = [sys.executable, "-m", "moemesh.cli", "up", "--model", model, "--port", "0", "--attn-nodes",
           str(args.attn_nodes), "--expert-nodes", str(args.expert_nodes), "--log-dir", logs, "--device", args.device,
           "--dtype", args.dtype, "--fp8", args.fp8, "--max-batched-tokens", str(args.max_batched_tokens),
           "--rebalance-interval", "0", "--ready-timeout", str(args.ready_timeout)]
    err = Path(logs) / "up.stderr"
    with err.open("w") as err_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], args.ready_timeout + 30)
        line = proc.stdout.readline() if ready else ""
        if not line:
            tail = err.read_text().strip().splitlines()[-1:] or ["no message"]
            raise MoemeshError(f"the embedded mesh did not come up ({tail[0][:300]}; logs in {logs})")
        yield json.loads(line)["router"]
    finally:
        terminate(proc, 60)


def _baseline(args, model: str, requests):
    import torch

    from moemesh import devices
    from moemesh.cli.bench import _load_hf
    from moemesh.cli.bench_serving_hf import run_baseline
    from moemesh.model.config import ModelConfig

    device = devices.resolve_device(args.device)
    dtype = devices.resolve_dtype(args.dtype, ModelConfig.from_dir(model).dtype, device)
    torch.manual_seed(0)
    hf = _load_hf(model, dtype, device)
    return run_baseline(hf, requests, args.baseline_batch, device)


def _config(args, model: str | None, target: str, requests) -> dict:
    return {"target": target, "model": model, "num_prompts": len(requests),
            "rate": args.rate if math.isfinite(args.rate) else "inf",  # JSON has no infinity
            "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "seed": args.seed,
            "input_len": None if args.lengths_file else args.input_len,
            "output_len": None if args.lengths_file else args.output_len, "lengths_file": args.lengths_file,
            "percentiles": args.percentiles, "goodput": dict(args.goodput_slos), "baseline": args.baseline,
            "baseline_batch": args.baseline_batch if args.baseline else None,
            "attn_nodes": args.attn_nodes if target == "embedded" else None,
            "expert_nodes": args.expert_nodes if target == "embedded" else None,
            "device": args.device, "dtype": args.dtype}


def run_serving(args: argparse.Namespace) -> int:
    from moemesh.cli.flags import UsageError
    from moemesh.cli.serving_metrics import format_table, parse_goodput, summarize

    args.goodput_slos = parse_goodput(args.goodput)
    args.plan = _plan(args)
    model = args.model
    if args.baseline and not model and (args.router or args.http):
        raise UsageError("--baseline transformers needs --model DIR: the checkpoint the router serves")
    vocab = args.vocab_size
    if vocab is None and model:
        from moemesh.model.config import ModelConfig

        vocab = ModelConfig.from_dir(model).vocab_size
    if args.http and vocab is None:
        raise UsageError("--http: give --model DIR (its config names the vocabulary) or --vocab-size V")
    if args.router or args.http:
        target = f"router {args.router}" if args.router else f"http {args.http}"
        requests, records, duration = asyncio.run(_run_target(args, args.router, vocab))
    else:
        from moemesh.launch.embedded import ensure_demo_model

        model = model or str(ensure_demo_model())
        target = "embedded"
        with embedded_mesh(args, model) as router:
            requests, records, duration = asyncio.run(_run_target(args, router, vocab))
    sides = {SIDE: (records, duration)}
    if args.baseline:
        sides[BASELINE] = _baseline(args, model, requests)
    summaries = {name: summarize(recs, dur, args.percentiles, args.goodput_slos) for name, (recs, dur) in sides.items()}
    out = {"config": _config(args, model, target, requests),
           **{name: {**summaries[name], "requests": [r.to_json() for r in sides[name][0]]} for name in sides}}
    from moemesh.cli.bench import emit_json

    if emit_json(args, out):
        return 0
    header = [f"Target: {target}" + (f" ({model})" if model else ""),
              f"Traffic request rate: {args.rate:g} req/s, burstiness {args.burstiness:g}"
              f"{' (Poisson process)' if args.burstiness == 1 and math.isfinite(args.rate) else ''}",
              f"Maximum request concurrency: {args.max_concurrency}"]
    if args.baseline:
        header.append(f"transformers: static batches of {args.baseline_batch}, arrival order, greedy")
    print(format_table(summaries, args.percentiles, header))
    failed = sum(s["failed"] for s in summaries.values())
    if failed:
        first = next(r.error for recs, _ in sides.values() for r in recs if r.error)
        print(f"{failed} request(s) failed; the first: {first}", file=sys.stderr)
    return 1 if failed else 0
