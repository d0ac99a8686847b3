"""``moemesh query`` and ``moemesh status``: a cluster's router, through the client SDK."""

from __future__ import annotations

import argparse
import json
import sys

from moemesh.router import MeshClient, MeshError
from moemesh.sampling import SamplingParams, flag_name

EXIT_RPC_ERROR = 1


def _client(args: argparse.Namespace) -> MeshClient:
    return MeshClient(args.router, token_file=args.token_file, tls=bool(args.tls_ca), ca_file=args.tls_ca,
                      cert_file=args.tls_cert, key_file=args.tls_key, timeout_s=args.timeout)


def _fail(command: str, exc: MeshError) -> int:
    print(f"moemesh {command}: {exc.status}: {exc.details}", file=sys.stderr)
    return EXIT_RPC_ERROR


def run_query(args: argparse.Namespace) -> int:
    kind, value = args.prompts[-1] if getattr(args, "prompts", None) else (None, None)
    if kind is None:
        print("moemesh query: error: give --prompt TEXT or --prompt-ids IDS", file=sys.stderr)
        return 2
    prompt = dict(prompt=value) if kind == "text" else dict(prompt_ids=list(value))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos,
                            stop=tuple(args.stop or ())).check(name=flag_name)  # before connecting
    try:
        with _client(args) as client:
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
        return _fail("query", exc)


def run_status(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            status = client.cluster_status()
    except MeshError as exc:
        return _fail("status", exc)
    if args.json:
        print(json.dumps(status))
        return 0
    print(format_status(status))
    return 0


def format_status(status: dict) -> str:
    """Placement (version, why, moves, balancedness per layer), then one line per node with its load."""
    lines = [f"placement version {status.get('placement_version', 0)}; leader {status.get('leader') or '-'}"]
    if status.get("placement_reason"):
        window = int(status.get("window_tokens", 0))
        lines.append(f"  planned because: {status['placement_reason']}; moved {status.get('moved', 0)} replicas; "
                     f"load window {window} routed tokens" + (" (no traffic yet: even spread)" if not window else ""))
    balance = status.get("balance") or []
    if balance:
        worst = min(b["balancedness"] for b in balance)
        per_layer = " ".join(f"{b['layer']}:{b['balancedness']:.3f}" for b in balance)
        lines.append(f"  balancedness (mean/max node load) worst {worst:.3f}; by layer {per_layer}")
    computed = sum(int(n.get("tokens_computed", 0)) for n in status.get("nodes", []) if n.get("role") == "expert")
    for node in status.get("nodes", []):
        if node.get("role") == "attn":
            load = (f"running {node.get('running', 0)}, waiting {node.get('waiting', 0)}, "
                    f"cache free {float(node.get('cache_free', 0)):.0%}")
        else:
            experts = sum(len(le.get("experts", [])) for le in node.get("experts", []))
            tokens = int(node.get("tokens_computed", 0))
            share = f" ({tokens / computed:.1%})" if computed else ""
            load = (f"{experts} experts, planned load {float(node.get('planned_load', 0)):.1%}, "
                    f"computed {tokens} routed tokens{share}")
        lines.append(f"  {node.get('role', '?'):6} {node.get('id', '?'):24} {node.get('address', '?'):22} "
                     f"{node.get('status', '?'):9} v{node.get('placement_version', 0):<4} {load}")
    return "\n".join(lines)
