"""``moemesh router``: serve ``moemesh.v1.Inference`` for a cluster until SIGTERM/SIGINT.

The CLI adds the subcommand with :func:`add_router_parser` and runs it with :func:`run_router`::

    moemesh router --etcd HOST:PORT [--cluster NAME] [--host H] [--port P] [--router-id ID]
                   [--auth-token-file F] [--tls-cert F --tls-key F [--tls-ca F]] [--max-inflight N]
                   [--max-queued N] [--max-running-per-client N] [--max-queued-per-client N]
                   [--lease-ttl S] [--rebalance-interval S] [--min-balance B] [--no-replicas]
                   [--settle S] [--http-port P [--http-host H] [--served-model-name N]
                   [--chat-template F] [--reasoning-parser deepseek-r1]] [--log-level L]

Prints ``{"event": "ready", "port": P, "router_id": ID}`` on stdout (and ``"http_port": P2`` with
``--http-port``) once connected to etcd
(gRPC health SERVING). Bad flags raise ValueError / MoemeshError / OSError with one-line messages.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import signal
import uuid
from typing import Callable

from moemesh.control.etcd import check_cluster_name, parse_endpoint
from moemesh.control.etcd_credentials import EtcdCredentials
from moemesh.argtypes import non_negative_int
from moemesh.argtypes import port as _port
from moemesh.argtypes import positive_int as _positive_int
from moemesh.argtypes import seconds_at_least
from moemesh.argtypes import unit_fraction as _balance
from moemesh.logs import get_logger

from .admission import DEFAULT_MAX_QUEUED, DEFAULT_MAX_QUEUED_PER_CLIENT, DEFAULT_MAX_RUNNING_PER_CLIENT
from .auth import TLSFiles, read_role_tokens, read_tokens_file, use_tokens
from .cluster import PlacementPolicy
from .planner import DEFAULT_MIN_BALANCE
from .openai_api.reasoning import REASONING_PARSERS
from .server import MAX_RESUMES, Router

log = get_logger("moemesh.router")


def add_router_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``router`` to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "router", help="serve the client-facing Inference service of a cluster",
        description="Serve moemesh.v1.Inference (Generate, Tokenize, ModelInfo, ClusterStatus) for the cluster "
        "registered in etcd: each Generate goes to the least loaded ready attention node (another one if it "
        "fails before its first token). Routers elect a leader in etcd; the leader writes the expert placement. "
        "Every replica serves clients. gRPC health (SERVING once connected to etcd) is open; with "
        "credentials (--tls-ca, tokens) every other call needs them (docs/security.md); "
        "prints {\"event\": \"ready\", \"port\": P, \"router_id\": ID} on stdout when serving.")
    p.add_argument("--etcd", required=True, metavar="HOST:PORT", help="etcd endpoint, e.g. 127.0.0.1:2379")
    p.add_argument("--cluster", default="default", help="cluster name: keys live under /moemesh/NAME/ "
                   "(default: default)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=0, help="port to listen on; 0 picks a free one (default: 0)")
    p.add_argument("--router-id", default=None, help="this replica's id in the leader key (default: random)")
    p.add_argument("--auth-token-file", default=None, metavar="F",
                   help="require 'authorization: Bearer <token>' on Inference calls, the token being one of F's "
                   "lines (one token per client; per-client limits tell clients apart by their token)")
    p.add_argument("--auth-tokens", default=None, metavar="F",
                   help="'<role> <token>' lines: accept these tokens as those roles, and send the router token to "
                   "the nodes it dials (docs/security.md)")
    p.add_argument("--tls-cert", default=None, metavar="F", help="PEM server certificate (with --tls-key): TLS port")
    p.add_argument("--tls-key", default=None, metavar="F", help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", default=None, metavar="F",
                   help="PEM CA: require client certificates it signed (mTLS)")
    p.add_argument("--max-inflight", type=_positive_int, default=512,
                   help="Generate streams forwarded to attention nodes at once; more wait at the router "
                        "(--max-queued) (default: 512)")
    p.add_argument("--max-queued", type=non_negative_int, default=DEFAULT_MAX_QUEUED,
                   help="Generate requests waiting at the router for a slot, all clients together; more are "
                        f"refused with RESOURCE_EXHAUSTED (default: {DEFAULT_MAX_QUEUED})")
    p.add_argument("--max-running-per-client", type=_positive_int, default=DEFAULT_MAX_RUNNING_PER_CLIENT,
                   help="Generate streams one client (bearer token, else client certificate, else address) may "
                        "have forwarded at once; more wait at the router (default: "
                        f"{DEFAULT_MAX_RUNNING_PER_CLIENT}, 3/4 of one default attention node's 64 running + 256 "
                        "waiting: raise it with more attention nodes)")
    p.add_argument("--max-queued-per-client", type=non_negative_int, default=DEFAULT_MAX_QUEUED_PER_CLIENT,
                   help="Generate requests one client may have waiting at the router; more are refused with "
                        f"RESOURCE_EXHAUSTED (default: {DEFAULT_MAX_QUEUED_PER_CLIENT}, half of --max-queued)")
    p.add_argument("--max-resumes", type=non_negative_int, default=MAX_RESUMES,
                   help="times one generation may move to another attention node after its node failed "
                        f"mid-stream; 0 ends such streams with the error (default: {MAX_RESUMES})")
    p.add_argument("--lease-ttl", type=seconds_at_least(2), default=5.0,
                   help="etcd lease TTL in seconds: how soon another router takes over a dead leader (default: 5)")
    g = p.add_argument_group("expert placement (done by the leader)")
    g.add_argument("--rebalance-interval", type=seconds_at_least(0), default=30.0, metavar="S",
                   help="re-plan expert placement every S seconds on the routed-token counts the attention nodes "
                   "report (their last 60 s); 0 = only when expert nodes join, leave or die (default: 30)")
    g.add_argument("--min-balance", type=_balance, default=DEFAULT_MIN_BALANCE, metavar="B",
                   help="re-plans move the fewest expert replicas that bring balancedness (mean / max node load "
                   "per layer) to B, in (0, 1]; none when re-sharing replicas' loads suffices "
                   f"(default: {DEFAULT_MIN_BALANCE})")
    g.add_argument("--no-replicas", action="store_true",
                   help="one replica per expert: leave spare expert slots empty instead of replicating hot experts")
    g.add_argument("--settle", type=seconds_at_least(0), default=1.0, metavar="S",
                   help="after an expert node joins, wait S seconds for others before planning (default: 1)")
    h = p.add_argument_group("OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health)")
    h.add_argument("--http-port", type=_port, default=None, metavar="P",
                   help="also serve the OpenAI API over HTTP on port P (0 picks a free one); same credentials as "
                   "gRPC ('Authorization: Bearer <token>'), HTTPS with --tls-cert (default: no HTTP)")
    h.add_argument("--http-host", default=None, metavar="H", help="address of the HTTP API (default: --host)")
    h.add_argument("--served-model-name", default=None, metavar="N",
                   help="the model's name in the HTTP API (default: the checkpoint directory's name)")
    h.add_argument("--chat-template", default=None, metavar="F",
                   help="a jinja chat template file for /v1/chat/completions, instead of the model's "
                   "tokenizer_config.json chat_template")
    h.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="split the model's <think>...</think> into reasoning_content (DeepSeek-R1)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def door_options(args: argparse.Namespace):
    """The HTTP door's options from the flags (the chat template file read now: a bad path fails at start)."""
    if getattr(args, "http_port", None) is None:
        return None
    from .openai_api.door import DoorOptions  # the HTTP stack loads only for routers that serve it

    template = None
    path = getattr(args, "chat_template", None)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                template = f.read()
        except OSError as exc:
            raise OSError(f"--chat-template {path}: {exc.strerror or exc}") from None
    return DoorOptions(served_model_name=getattr(args, "served_model_name", None), chat_template=template,
                       reasoning_parser=getattr(args, "reasoning_parser", None))


async def serve_router(etcd: str, cluster: str, host: str, port: int, *, router_id: str | None = None,
                       auth_token: str | tuple[str, ...] | None = None, tls: TLSFiles | None = None,
                       ready_cb: Callable[[int, int | None], object] | None = None, max_inflight: int = 512,
                       ttl_s: float = 5.0, stop: asyncio.Event | None = None,
                       health_port: int | None = None, policy: PlacementPolicy | None = None,
                       max_resumes: int = MAX_RESUMES, etcd_credentials: EtcdCredentials | None = None,
                       max_queued: int = DEFAULT_MAX_QUEUED,
                       max_running_per_client: int = DEFAULT_MAX_RUNNING_PER_CLIENT,
                       max_queued_per_client: int = DEFAULT_MAX_QUEUED_PER_CLIENT, http_port: int | None = None,
                       http_host: str | None = None, door_options=None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set); ``ready_cb(port, http_port)`` once connected to etcd."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            pass
    router = Router(etcd, cluster, host, port, router_id=router_id, auth_token=auth_token, tls=tls,
                    max_inflight=max_inflight, ttl_s=ttl_s, health_port=health_port, policy=policy,
                    max_resumes=max_resumes, etcd_credentials=etcd_credentials, max_queued=max_queued,
                    max_running_per_client=max_running_per_client, max_queued_per_client=max_queued_per_client,
                    http_port=http_port, http_host=http_host, door_options=door_options)
    try:
        await router.start()
        waiter = asyncio.ensure_future(router.connected())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        if waiter.done() and ready_cb is not None:
            result = ready_cb(router.port, router.http_port)
            if inspect.isawaitable(result):
                await result
        await stopper
        waiter.cancel()
        log.info("router_stopping", router_id=router.router_id)
    finally:
        await router.stop()
        for sig in handled:
            loop.remove_signal_handler(sig)


def _policy(args: argparse.Namespace) -> PlacementPolicy:
    default = PlacementPolicy()
    return PlacementPolicy(settle_s=getattr(args, "settle", default.settle_s),
                           rebalance_interval_s=getattr(args, "rebalance_interval", default.rebalance_interval_s),
                           min_balance=getattr(args, "min_balance", default.min_balance),
                           replicate=not getattr(args, "no_replicas", False))


def run_router(args: argparse.Namespace) -> int:
    """Run ``moemesh router`` from parsed flags (see :func:`add_router_parser`); returns the exit code."""
    parse_endpoint(args.etcd)  # ValueError naming the flag's format
    check_cluster_name(args.cluster)
    tls = TLSFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca)
    token = read_tokens_file(args.auth_token_file) if args.auth_token_file else None
    if getattr(args, "auth_tokens", None):
        use_tokens(read_role_tokens(args.auth_tokens), "router")
    router_id = getattr(args, "router_id", None) or f"router-{uuid.uuid4().hex[:8]}"

    options = door_options(args)

    def ready(port: int, http_port: int | None) -> None:
        door = {} if http_port is None else {"http_port": http_port}
        print(json.dumps({"event": "ready", "port": port, "router_id": router_id, **door}), flush=True)

    asyncio.run(serve_router(args.etcd, args.cluster, args.host, args.port, router_id=router_id,
                             auth_token=token, tls=tls, ready_cb=ready,
                             max_inflight=getattr(args, "max_inflight", 512), ttl_s=getattr(args, "lease_ttl", 5.0),
                             health_port=getattr(args, "health_port", None), policy=_policy(args),
                             max_resumes=getattr(args, "max_resumes", MAX_RESUMES),
                             etcd_credentials=getattr(args, "etcd_credentials", None),
                             max_queued=getattr(args, "max_queued", DEFAULT_MAX_QUEUED),
                             max_running_per_client=getattr(args, "max_running_per_client",
                                                            DEFAULT_MAX_RUNNING_PER_CLIENT),
                             max_queued_per_client=getattr(args, "max_queued_per_client",
                                                           DEFAULT_MAX_QUEUED_PER_CLIENT),
                             http_port=getattr(args, "http_port", None), http_host=getattr(args, "http_host", None),
                             door_options=options))
    return 0
