"""``moemesh query``: one generation through a cluster's router, with the client SDK."""

from __future__ import annotations

import argparse
import json
import sys

from moemesh.cli import flags
from moemesh.router import MeshClient, MeshError
from moemesh.sampling import SamplingParams, flag_name

EXIT_RPC_ERROR = 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("query", help="send a generation to a running mesh's router",
                              description="Generate through a router with the client SDK. Streams text as it arrives; "
                              "--json prints one object (token_ids, text, finish_reason, usage) when done. Errors: exit 1 "
                              "and one line with the gRPC status name (e.g. INVALID_ARGUMENT, UNAUTHENTICATED).")
    flags.add_router_client_args(p)
    flags.add_sampling_args(p, several_prompts=False)
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object when done")
    return p


def client_for(args: argparse.Namespace) -> MeshClient:
    return MeshClient(args.router, token_file=args.token_file, tls=bool(args.tls_ca), ca_file=args.tls_ca,
                      cert_file=args.tls_cert, key_file=args.tls_key, timeout_s=args.timeout)


def fail(command: str, exc: MeshError) -> int:
    print(f"moemesh {command}: {exc.status}: {exc.details}", file=sys.stderr)
    return EXIT_RPC_ERROR


def run(args: argparse.Namespace) -> int:
    kind, value = args.prompts[-1] if getattr(args, "prompts", None) else (None, None)
    if kind is None:
        print("moemesh query: error: give --prompt TEXT or --prompt-ids IDS", file=sys.stderr)
        return 2
    prompt = dict(prompt=value) if kind == "text" else dict(prompt_ids=list(value))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos,
                            stop=tuple(args.stop or ())).check(name=flag_name)  # before connecting
    try:
        with client_for(args) as client:
            if args.json:
                r = client.generate(**prompt, params=params)
                print(json.dumps({"request_id": r.request_id, "token_ids": r.token_ids, "text": r.text,
                                  "finish_reason": r.finish_reason,
                                  "usage": {"prompt_tokens": r.usage.prompt_tokens,
                                            "completion_tokens": r.usage.completion_tokens}}))
                return 0
            as_text = client.model_info().has_tokenizer  # without a tokenizer, show the token ids
            for chunk in client.stream(**prompt, params=params):
                # Empty text is normal mid-character: the next chunk completes it.
                sys.stdout.write(chunk.text if as_text else "".join(f"{t} " for t in chunk.token_ids))
                sys.stdout.flush()
            sys.stdout.write("\n")
            return 0
    except MeshError as exc:
        return fail("query", exc)
