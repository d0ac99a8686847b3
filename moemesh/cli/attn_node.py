"""``moemesh attn-node``: serve the attention side (engine and latent KV cache) behind its gRPC service."""

from __future__ import annotations

import argparse

from moemesh.argtypes import non_negative_float, positive_float, positive_int
from moemesh.cli import flags
from moemesh.cli.flags import UsageError
from moemesh.wire.identity import read_role_tokens, use_tokens
from moemesh.wire.tls import TLSFiles


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("attn-node", help="serve the attention side (engine + KV cache) over gRPC",
                              description="Run the continuous-batching engine with the MLA latent cache behind the internal "
                              "AttentionNode gRPC service (health, reflection). Routed experts live on expert nodes: found "
                              "through etcd (--etcd: the leader router's placement) or given with --expert-nodes. Prints "
                              "{\"event\": \"ready\", \"port\": P} on stdout once serving; SIGTERM drains.")
    flags.add_model_arg(p)
    flags.add_node_args(p, "attn")
    p.add_argument("--expert-nodes", action="append", metavar="HOST:PORT=SPEC,...",
                   help="a fixed placement instead of etcd's (as in `moemesh generate --expert-nodes`)")
    p.add_argument("--dispatch-timeout", type=positive_float, default=30.0,
                   help="seconds an expert node may take per MoE layer before its rows go to a replica")
    p.add_argument("--max-pending", type=positive_int, default=256,
                   help="requests waiting for the engine at most; more are refused with RESOURCE_EXHAUSTED")
    p.add_argument("--expert-wait", type=non_negative_float, default=30.0, metavar="S",
                   help="when a step's experts are on no reachable node, wait up to S seconds for the leader's "
                   "re-plan and re-run the step; then fail its requests (default: 30)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model's name to clients (ModelInfo.model_name, the HTTP door's model id), as vLLM's "
                   "flag (default: the --model directory's name)")
    flags.add_transport_arg(p, "attn")
    flags.add_engine_args(p)
    flags.add_threads_arg(p, "attention, shared experts and the lm_head")
    return p


def run(args: argparse.Namespace) -> int:
    import asyncio

    from moemesh.attn_node.serve import serve_attention
    from moemesh.model.config import ModelConfig
    from moemesh.cli.generate import engine_config
    from moemesh.devices import resolve_device
    from moemesh.kernels.cpu_kernels import resolve_weights_dtype
    from moemesh.control.placement import Placement, parse_expert_nodes, parse_expert_spec

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.etcd is None and not args.expert_nodes:
        raise UsageError("give --etcd HOST:PORT (placement from the router) or --expert-nodes HOST:PORT=SPEC,...")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise UsageError("--served-model-name must not be empty (leave it out to use the --model directory's name)")
    device = resolve_device(args.device)  # before anything loads: a missing GPU is one line, not a traceback
    flags.apply_threads(args.threads)
    if args.auth_tokens:
        use_tokens(read_role_tokens(args.auth_tokens), "attn")
    cfg = ModelConfig.from_dir(args.model)
    static = None
    if args.expert_nodes:
        nodes = [node for text in args.expert_nodes for node in parse_expert_nodes(text)]
        static = Placement.from_hosted(
            [(address, parse_expert_spec(spec, cfg.moe_layers, cfg.n_routed_experts)) for address, spec in nodes])
    asyncio.run(serve_attention(
        args.model, args.host, args.port, resolve_weights_dtype(args.dtype, cfg.dtype, device), engine_config(args), etcd=args.etcd,
        cluster=args.cluster, static=static, node_id=args.node_id, advertise=args.advertise_host,
        kernels=args.kernels, dispatch_timeout_s=args.dispatch_timeout, max_pending=args.max_pending,
        tls=TLSFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca), health_port=args.health_port,
        transport=args.transport, device=device, etcd_credentials=flags.etcd_credentials(args),
        served_model_name=args.served_model_name))
    return 0
