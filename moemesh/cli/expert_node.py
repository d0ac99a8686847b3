"""``moemesh expert-node``: serve a shard of routed experts (fixed, or as the placement in etcd says)."""

from __future__ import annotations

import argparse
import os

from moemesh.argtypes import positive_int
from moemesh.cli import flags
from moemesh.cli.flags import UsageError
from moemesh.wire.identity import read_role_tokens, use_tokens
from moemesh.wire.limits import DEFAULT_MAX_BATCHED_TOKENS
from moemesh.wire.tls import TLSFiles


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("expert-node", help="serve a shard of routed experts over gRPC",
                              description="Load the routed experts named by --experts (and nothing else) and serve the "
                              "ExpertDispatch gRPC service, with grpc.health.v1 (SERVING once loaded) and reflection. "
                              "Prints {\"event\": \"ready\", \"port\": P} on stdout when serving. SIGTERM finishes "
                              "in-flight messages, then exits.")
    flags.add_model_arg(p)
    p.add_argument("--experts", metavar="SPEC",
                   help="experts to host, fixed: '0-7' (those ids in every MoE layer), '3:0-7' (layer 3 only), "
                   "comma-separated items, or 'all'. Without it, --etcd is required and the router's placement "
                   "says what to host")
    flags.add_node_args(p, "expert")
    p.add_argument("--slots", type=positive_int, default=None,
                   help="experts per MoE layer this node can hold, at most (its memory budget). Default: no "
                   "limit of its own; the router sizes every node's slots so that losing any one expert node "
                   "leaves every expert a replica (min(E, ceil(2E/N)) for N live nodes, plus a tenth of the even "
                   "share for hot replicas), so a node may be asked to hold more after another is lost")
    p.add_argument("--zone", default=None, metavar="Z",
                   help="this node's failure domain (rack, zone), with --etcd: the router puts an expert's replicas "
                   "in different zones when the slots allow, and warns when losing a zone would leave experts "
                   "unhosted (default: $MOEMESH_ZONE when set and not empty, e.g. from the pod's "
                   "topology.kubernetes.io/zone label: deploy/README.md; else none, and nodes without a zone count "
                   "as a zone each)")
    p.add_argument("--max-batched-tokens", type=positive_int, default=DEFAULT_MAX_BATCHED_TOKENS, metavar="T",
                   help="the largest step (tokens) of the attention nodes it serves: sizes the largest Dispatch "
                   "message taken (T x hidden x 4 bytes, plus ids and weights and 1 MiB); larger ones are refused "
                   "with RESOURCE_EXHAUSTED, and attention nodes split theirs to fit (default: "
                   f"{DEFAULT_MAX_BATCHED_TOKENS}, the attention nodes' default)")
    flags.add_device_args(p, "expert weight")
    flags.add_threads_arg(p, "the expert math")
    flags.add_transport_arg(p, "expert")
    p.add_argument("--torch-port", type=int, default=0, metavar="P",
                   help="with --transport torch: port of the TCPStore where groups rendezvous (default: 0 = any)")
    return p


def zone_from(args: argparse.Namespace, env) -> str | None:
    """``--zone``, else ``MOEMESH_ZONE`` (empty: none, as a downward-API label the node lacks gives)."""
    if getattr(args, "zone", None) is not None:
        return args.zone.strip()
    return (env.get("MOEMESH_ZONE") or "").strip() or None


def run(args: argparse.Namespace) -> int:
    import asyncio

    from moemesh.control.placement import parse_expert_spec
    from moemesh.devices import resolve_device
    from moemesh.kernels.cpu_fp8 import resolve_keep_fp8
    from moemesh.kernels.cpu_kernels import resolve_weights_dtype
    from moemesh.expert_node.main import serve
    from moemesh.model.config import ModelConfig

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if not 0 <= args.torch_port <= 65535:
        raise UsageError(f"--torch-port must be in 0..65535, got {args.torch_port}")
    device = resolve_device(args.device)  # before anything loads: a missing GPU is one line, not a traceback
    flags.apply_threads(args.threads)
    cfg = ModelConfig.from_dir(args.model)
    dtype = resolve_weights_dtype(args.dtype, cfg.dtype, device)
    keep = resolve_keep_fp8(args.fp8, device)
    tls = TLSFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca)
    if args.auth_tokens:
        use_tokens(read_role_tokens(args.auth_tokens), "expert")
    from moemesh.expert_node.server import message_limit

    message_limit(cfg, args.max_batched_tokens)  # a step too large for gRPC fails here, before loading
    if getattr(args, "zone", None) is not None and not args.zone.strip():
        raise UsageError("--zone must be a non-empty name (a rack or zone), or left out")
    if args.experts is None:
        args.zone = zone_from(args, os.environ)
        if args.etcd is None:
            raise UsageError("give --experts SPEC (a fixed shard) or --etcd HOST:PORT (the router's placement)")
        from moemesh.expert_node.registered import serve_registered

        asyncio.run(serve_registered(args.model, args.etcd, args.cluster, args.host, args.port, dtype,
                                     node_id=args.node_id, slots=args.slots, advertise=args.advertise_host,
                                     zone=getattr(args, "zone", None),
                                     tls=tls, health_port=args.health_port, transport=args.transport,
                                     torch_port=args.torch_port, device=device, keep_fp8=keep,
                                     etcd_credentials=flags.etcd_credentials(args),
                                     max_batched_tokens=args.max_batched_tokens))
        return 0
    if getattr(args, "zone", None) is not None:
        raise UsageError("--zone needs --etcd without --experts: zones steer the router's placement, a fixed "
                         "--experts shard has none")
    parse_expert_spec(args.experts, cfg.moe_layers, cfg.n_routed_experts)  # a bad spec fails before binding
    asyncio.run(serve(args.model, args.experts, args.host, args.port, dtype, tls=tls,
                      health_port=args.health_port, transport=args.transport, torch_port=args.torch_port,
                      device=device, keep_fp8=keep, max_batched_tokens=args.max_batched_tokens))
    return 0
