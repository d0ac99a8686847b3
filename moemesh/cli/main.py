"""The ``moemesh`` command line: one entry point, a subcommand per job.

Every failure a user can cause (a missing model directory, a config that is not
DeepSeek, an out-of-range argument) ends with one line on stderr saying what to
fix and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from moemesh.argtypes import non_negative_float as _non_negative_float
from moemesh.argtypes import positive_float as _positive_float
from moemesh.argtypes import positive_int as _positive_int
from moemesh.argtypes import seed as _seed
from moemesh.model.config import ConfigError
from moemesh.wire.tls import TLSFiles
from moemesh.errors import MoemeshError

EXIT_USAGE = 2


class UsageError(MoemeshError):
    """A command-line argument is wrong; the message says which and why."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, and where to look), exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


class _OrderedPrompts(argparse.Action):
    """--prompt and --prompt-ids share one list so prompts keep the order they were given in."""

    def __call__(self, parser, namespace, values, option_string=None):
        prompts = list(getattr(namespace, "prompts", None) or [])
        prompts.append(("ids", values) if option_string == "--prompt-ids" else ("text", values))
        namespace.prompts = prompts


def _add_model_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--model",
        required=required,
        metavar="DIR",
        help="HF-format DeepSeek-V2/V3 checkpoint directory (config.json, *.safetensors, optional tokenizer.json)"
        + ("" if required else "; default: a tiny random demo checkpoint, written on first use"),
    )


def _add_router_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", required=True, metavar="HOST:PORT", help="the router's client address")
    p.add_argument("--token-file", metavar="F", help="file holding the bearer token the router requires")
    p.add_argument("--tls-ca", metavar="F", help="CA certificate to verify the router (turns TLS on)")
    p.add_argument("--tls-cert", metavar="F", help="client certificate, for a router requiring mTLS")
    p.add_argument("--tls-key", metavar="F", help="client private key, for a router requiring mTLS")
    p.add_argument("--timeout", type=_positive_float, default=300.0, help="seconds for the whole call (default: 300)")


def _add_node_args(p: argparse.ArgumentParser, role: str) -> None:
    p.add_argument("--etcd", metavar="HOST:PORT", help="etcd endpoint: register there and follow the placement")
    p.add_argument("--cluster", default="default", help="cluster name: keys live under /moemesh/<cluster>/")
    p.add_argument("--node-id", help=f"id in the registry (default: {role}-<hostname>-<port>)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--advertise-host", help="host other nodes dial (default: the listen host; hostname for 0.0.0.0)")
    p.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (default: 0)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--tls-cert", metavar="F", help="PEM certificate: serve TLS, and present it when dialing nodes")
    p.add_argument("--tls-key", metavar="F", help="PEM private key for --tls-cert")
    p.add_argument("--tls-ca", metavar="F", help="CA of the mesh: require client certificates it signed (mTLS) "
                   "and verify the nodes this one dials")
    _add_metrics_arg(p)


def _add_metrics_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help="serve Prometheus metrics at http://0.0.0.0:P/metrics (default: off)")
    p.add_argument("--health-port", type=int, default=None, metavar="P",
                   help="also serve grpc.health.v1 alone, in plaintext, on P: for probes that cannot do (m)TLS, "
                   "such as Kubernetes' native gRPC probes (default: off)")


TRANSPORTS = ("grpc", "torch")


def _add_transport_arg(p: argparse.ArgumentParser, role: str) -> None:
    help_text = {
        "attn": "how routed-expert rows travel: grpc (Dispatch streams) or torch (a torch.distributed group per "
                "expert node, NCCL on CUDA, gloo on CPU, with gRPC as the fallback; the expert nodes must run "
                "--transport torch too, else their rows go over gRPC) (default: grpc)",
        "expert": "torch: also serve TorchTransport sessions (a torch.distributed group per attention node; "
                  "Dispatch stays the fallback) (default: grpc)",
        "up": "the expert transport of every attention and expert node (default: grpc)",
        "bench": "torch: also measure the torch transport, side by side with gRPC in the same run (--mesh) "
                 "(default: grpc)",
    }[role]
    p.add_argument("--transport", default="grpc", choices=TRANSPORTS, help=help_text)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; auto = the checkpoint's on GPU, float32 on CPU (default: auto)")
    p.add_argument("--kv-cache-tokens", type=_positive_int, default=32768,
                   help="latent KV cache capacity in tokens, shared by all sequences (default: 32768)")
    p.add_argument("--block-size", type=_positive_int, default=16, help="KV cache block size in tokens (default: 16)")
    p.add_argument("--max-num-seqs", type=_positive_int, default=64,
                   help="sequences in the running batch at most (default: 64)")
    p.add_argument("--max-batched-tokens", type=_positive_int, default=512,
                   help="tokens computed per step at most; longer prompts are prefilled in chunks (default: 512)")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "reference"],
                   help="auto = Triton kernels on CUDA, plain-torch references on CPU; triton forces the kernels "
                   "(on CPU set TRITON_INTERPRET=1 to run them in Triton's interpreter, slowly) (default: auto)")
    p.add_argument("--micro-batches", type=_positive_int, default=1,
                   help="split each step into this many micro-batches run in ping-pong, so one's attention "
                   "overlaps another's remote experts. Pays off when attention and experts run on separate "
                   "hardware; on one shared CPU it costs (each micro-batch re-reads the expert weights) "
                   "(default: 1 = off; bench --mesh measures 2)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moemesh",
        description="Serve DeepSeek-V2/V3 mixture-of-experts models with attention/expert disaggregation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    p = sub.add_parser("tiny-checkpoint", help="write a small random DeepSeek checkpoint (for tests and demos)",
                       description="Write a small random HF-format DeepSeek checkpoint (config.json, "
                       "model.safetensors, tokenizer.json) that transformers itself loads.")
    p.add_argument("dir", metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--arch", default="deepseek_v2", choices=["deepseek_v2", "deepseek_v3"],
                   help="V2: softmax greedy routing, no q_lora_rank; V3: sigmoid noaux_tc routing with groups and "
                   "correction bias, q_lora_rank set (default: deepseek_v2)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes identical files")
    p.add_argument("--hidden-size", type=_positive_int, default=128, help="hidden size D (default: 128)")
    p.add_argument("--layers", type=_positive_int, default=3, help="decoder layers; the first is dense (default: 3)")
    p.add_argument("--experts", type=_positive_int, default=16, help="routed experts per MoE layer (default: 16)")
    p.add_argument("--experts-per-token", type=_positive_int, default=4, help="top-k experts per token (default: 4)")
    p.add_argument("--shared-experts", type=int, default=1, help="shared experts per MoE layer (default: 1)")
    p.add_argument("--kv-lora-rank", type=_positive_int, default=32, help="MLA latent size C (default: 32)")
    p.add_argument("--vocab-size", type=_positive_int, default=512, help="vocabulary size (default: 512)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="stored weight dtype (default: float32)")

    p = sub.add_parser("generate", help="generate from one or more prompts on this machine",
                       description="Run prompts through the single-process engine (attention and every expert in "
                       "this process) as one continuously batched job. Without --json, text streams as it is "
                       "generated, prompt by prompt in order.")
    _add_model_arg(p, required=False)
    p.add_argument("--prompt", action=_OrderedPrompts, metavar="TEXT", help="a text prompt (repeatable)")
    p.add_argument("--prompt-ids", action=_OrderedPrompts, type=_token_ids, metavar="IDS",
                   help="a prompt as comma-separated token ids, e.g. 1,2,3 (repeatable)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt at most (default: 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default: 0 = off)")
    p.add_argument("--seed", type=_seed, default=None, help="seed for sampling; prompt i uses seed + i")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt, in order, when done")
    p.add_argument("--expert-nodes", action="append", metavar="HOST:PORT=SPEC,...",
                   help="run only the attention side here and send routed experts to these expert nodes "
                   "(SPEC as in `moemesh expert-node --experts`; repeatable). Several nodes may host the same "
                   "experts: rows are split across such replicas, and a lost node's rows go to another replica")
    p.add_argument("--dispatch-timeout", type=_positive_float, default=30.0,
                   help="seconds an expert node may take per MoE layer before its rows go to a replica "
                   "(default: 30)")
    _add_transport_arg(p, "attn")
    _add_engine_args(p)

    p = sub.add_parser("expert-node", help="serve a shard of routed experts over gRPC",
                       description="Load the routed experts named by --experts (and nothing else) and serve the "
                       "ExpertDispatch gRPC service, with grpc.health.v1 (SERVING once loaded) and reflection. "
                       "Prints {\"event\": \"ready\", \"port\": P} on stdout when serving. SIGTERM finishes "
                       "in-flight messages, then exits.")
    _add_model_arg(p)
    p.add_argument("--experts", metavar="SPEC",
                   help="experts to host, fixed: '0-7' (those ids in every MoE layer), '3:0-7' (layer 3 only), "
                   "comma-separated items, or 'all'. Without it, --etcd is required and the router's placement "
                   "says what to host")
    _add_node_args(p, "expert")
    p.add_argument("--slots", type=_positive_int, default=None,
                   help="experts per MoE layer this node can hold (default: all of them); the router replicates "
                   "experts into spare slots")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="expert weight dtype; auto = the checkpoint's on GPU, float32 on CPU")
    _add_transport_arg(p, "expert")
    p.add_argument("--torch-port", type=int, default=0, metavar="P",
                   help="with --transport torch: port of the TCPStore where groups rendezvous (default: 0 = any)")

    p = sub.add_parser("attn-node", help="serve the attention side (engine + KV cache) over gRPC",
                       description="Run the continuous-batching engine with the MLA latent cache behind the internal "
                       "AttentionNode gRPC service (health, reflection). Routed experts live on expert nodes: found "
                       "through etcd (--etcd: the leader router's placement) or given with --expert-nodes. Prints "
                       "{\"event\": \"ready\", \"port\": P} on stdout once serving; SIGTERM drains.")
    _add_model_arg(p)
    _add_node_args(p, "attn")
    p.add_argument("--expert-nodes", action="append", metavar="HOST:PORT=SPEC,...",
                   help="a fixed placement instead of etcd's (as in `moemesh generate --expert-nodes`)")
    p.add_argument("--dispatch-timeout", type=_positive_float, default=30.0,
                   help="seconds an expert node may take per MoE layer before its rows go to a replica")
    p.add_argument("--max-pending", type=_positive_int, default=256,
                   help="requests waiting for the engine at most; more are refused with RESOURCE_EXHAUSTED")
    p.add_argument("--expert-wait", type=_non_negative_float, default=30.0, metavar="S",
                   help="when a step's experts are on no reachable node, wait up to S seconds for the leader's "
                   "re-plan and re-run the step; then fail its requests (default: 30)")
    _add_transport_arg(p, "attn")
    _add_engine_args(p)

    from moemesh.router.main import add_router_parser

    _add_metrics_arg(add_router_parser(sub))

    from moemesh.cli.plan import add_plan_parser

    add_plan_parser(sub)

    p = sub.add_parser("up", help="run the whole mesh on this machine: etcd, router, attention and expert nodes",
                       description="Start etcd (data in a temporary directory), the router, the expert nodes and the "
                       "attention nodes as separate processes on 127.0.0.1. Without --model, a tiny random demo "
                       "checkpoint is written and used. Prints one JSON line with the router address when the mesh "
                       "is ready; Ctrl-C or SIGTERM stops every process it started.")
    _add_model_arg(p, required=False)
    p.add_argument("--attn-nodes", type=_positive_int, default=1, help="attention node processes (default: 1)")
    p.add_argument("--expert-nodes", type=_positive_int, default=2, help="expert node processes (default: 2)")
    p.add_argument("--host", default="127.0.0.1", help="router listen address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="router port for clients; 0 picks one (default: 50051)")
    p.add_argument("--etcd-port", type=int, default=0, help="etcd client port; 0 picks one (default: 0)")
    p.add_argument("--cluster", default="default", help="cluster name in etcd (default: default)")
    p.add_argument("--auth-token-file", metavar="F", help="the router requires this bearer token from clients")
    p.add_argument("--tls-cert", metavar="F", help="router TLS certificate (with --tls-key)")
    p.add_argument("--tls-key", metavar="F", help="router TLS private key")
    p.add_argument("--tls-ca", metavar="F", help="CA for client certificates: the router then requires mTLS")
    p.add_argument("--log-dir", metavar="DIR", help="where each process writes its log (default: a temporary dir)")
    p.add_argument("--ready-timeout", type=_positive_float, default=300.0,
                   help="seconds to wait for every process to be ready (default: 300)")
    p.add_argument("--expert-slots", type=_positive_int, default=None, metavar="S",
                   help="experts per MoE layer each expert node can hold (default: the even share plus 25%%, "
                   "room for replicas of hot experts)")
    p.add_argument("--rebalance-interval", type=_non_negative_float, default=30.0, metavar="S",
                   help="the router re-plans expert placement on measured loads every S seconds; 0 = only when "
                   "expert nodes join or leave (default: 30)")
    p.add_argument("--no-replicas", action="store_true", help="one replica per expert (no hot-expert replicas)")
    p.add_argument("--dispatch-timeout", type=_positive_float, default=30.0, metavar="S",
                   help="seconds an expert node may take per MoE layer before the attention nodes send its rows "
                   "to a replica (default: 30)")
    p.add_argument("--control-port", type=int, default=0,
                   help="port of the MeshControl service that adds and removes expert nodes while the mesh runs "
                   "(`moemesh mesh`); 0 picks one, printed as \"control\" in the ready line (default: 0)")

    from moemesh.cli.mesh import add_mesh_parser

    add_mesh_parser(sub)
    _add_transport_arg(p, "up")

    p = sub.add_parser("query", help="send a generation to a running mesh's router",
                       description="Generate through a router with the client SDK. Streams text as it arrives; "
                       "--json prints one object (token_ids, text, finish_reason, usage) when done. Errors: exit 1 "
                       "and one line with the gRPC status name (e.g. INVALID_ARGUMENT, UNAUTHENTICATED).")
    _add_router_client_args(p)
    p.add_argument("--prompt", action=_OrderedPrompts, metavar="TEXT", help="a text prompt")
    p.add_argument("--prompt-ids", action=_OrderedPrompts, type=_token_ids, metavar="IDS",
                   help="a prompt as comma-separated token ids")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default: 0 = off)")
    p.add_argument("--seed", type=_seed, default=None, help="sampling seed")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--json", action="store_true", help="print one JSON object when done")

    p = sub.add_parser("status", help="nodes, placement and loads of a running mesh",
                       description="Ask a router for the cluster status: every node (role, address, status, "
                       "experts or load) and the placement version.")
    _add_router_client_args(p)
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")

    p = sub.add_parser("bench", help="tokens/s of transformers and of moemesh on the same workload",
                       description="Run the same greedy workload (random prompts) through transformers' generate "
                       "and through the moemesh engine in one run; print tokens/s of each, the ratio, whether the "
                       "tokens agree, and the latent cache bytes per token next to what MHA would need. Needs "
                       "transformers (pip install 'moemesh[bench]').")
    _add_model_arg(p)
    p.add_argument("--batch", type=_positive_int, default=16, help="prompts run together (default: 16)")
    p.add_argument("--prompt-len", type=_positive_int, default=32, help="tokens per prompt (default: 32)")
    p.add_argument("--new-tokens", type=_positive_int, default=32, help="tokens generated per prompt (default: 32)")
    p.add_argument("--repeats", type=_positive_int, default=1, help="timed runs per side; the best counts")
    p.add_argument("--json", action="store_true", help="print one JSON object with the figures")
    p.add_argument("--mesh", action="store_true",
                   help="instead: start 2 expert node processes on loopback and compare the single process with "
                   "the mesh (micro-batch overlap on and off), and one dispatch hop with a raw TCP echo")
    p.add_argument("--hop-samples", type=_positive_int, default=300, help="round trips timed for the hop (--mesh)")
    _add_transport_arg(p, "bench")
    _add_engine_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from moemesh import logs

    logs.configure(getattr(args, "log_level", "warning"))  # JSON lines on stderr: stdout stays the command's output
    try:
        if getattr(args, "metrics_port", None) is not None:
            from moemesh.metrics import serve_metrics

            serve_metrics(args.metrics_port)
        if args.command == "tiny-checkpoint":
            return _cmd_tiny(args)
        if args.command == "generate":
            from moemesh.cli.generate import run_generate

            return run_generate(args)
        if args.command == "expert-node":
            return _cmd_expert_node(args)
        if args.command == "attn-node":
            return _cmd_attn_node(args)
        if args.command == "router":
            from moemesh.router.main import run_router

            return run_router(args)
        if args.command == "plan":
            from moemesh.cli.plan import run_plan

            return run_plan(args)
        if args.command == "up":
            from moemesh.cli.up import run_up

            return run_up(args)
        if args.command == "query":
            from moemesh.cli.query import run_query

            return run_query(args)
        if args.command == "mesh":
            import grpc

            from moemesh.cli.mesh import run_mesh

            try:
                return run_mesh(args)
            except grpc.RpcError as exc:
                print(f"moemesh mesh: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
        if args.command == "status":
            from moemesh.cli.query import run_status

            return run_status(args)
        if args.command == "bench" and args.mesh:
            from moemesh.cli.bench_mesh import run_mesh_bench

            return run_mesh_bench(args)
        if args.command == "bench":
            from moemesh.cli.bench import run_bench

            return run_bench(args)
    except (ConfigError, MoemeshError, ValueError, OSError) as exc:
        print(f"moemesh {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def _cmd_expert_node(args: argparse.Namespace) -> int:
    import asyncio

    from moemesh.model.config import ModelConfig
    from moemesh.expert_node.main import serve
    from moemesh.launch.embedded import resolve_dtype
    from moemesh.control.placement import parse_expert_spec

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if not 0 <= args.torch_port <= 65535:
        raise UsageError(f"--torch-port must be in 0..65535, got {args.torch_port}")
    cfg = ModelConfig.from_dir(args.model)
    dtype = resolve_dtype(args.dtype, cfg)
    tls = TLSFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca)
    if args.experts is None:
        if args.etcd is None:
            raise UsageError("give --experts SPEC (a fixed shard) or --etcd HOST:PORT (the router's placement)")
        from moemesh.expert_node.registered import serve_registered

        asyncio.run(serve_registered(args.model, args.etcd, args.cluster, args.host, args.port, dtype,
                                     node_id=args.node_id, slots=args.slots, advertise=args.advertise_host,
                                     tls=tls, health_port=args.health_port, transport=args.transport,
                                     torch_port=args.torch_port))
        return 0
    parse_expert_spec(args.experts, cfg.moe_layers, cfg.n_routed_experts)  # a bad spec fails before binding
    asyncio.run(serve(args.model, args.experts, args.host, args.port, dtype, tls=tls,
                      health_port=args.health_port, transport=args.transport, torch_port=args.torch_port))
    return 0


def _cmd_attn_node(args: argparse.Namespace) -> int:
    import asyncio

    from moemesh.attn_node.serve import serve_attention
    from moemesh.model.config import ModelConfig
    from moemesh.cli.generate import engine_config
    from moemesh.launch.embedded import resolve_dtype
    from moemesh.control.placement import Placement, parse_expert_nodes, parse_expert_spec

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.etcd is None and not args.expert_nodes:
        raise UsageError("give --etcd HOST:PORT (placement from the router) or --expert-nodes HOST:PORT=SPEC,...")
    cfg = ModelConfig.from_dir(args.model)
    static = None
    if args.expert_nodes:
        nodes = [node for text in args.expert_nodes for node in parse_expert_nodes(text)]
        static = Placement.from_hosted(
            [(address, parse_expert_spec(spec, cfg.moe_layers, cfg.n_routed_experts)) for address, spec in nodes])
    asyncio.run(serve_attention(
        args.model, args.host, args.port, resolve_dtype(args.dtype, cfg), engine_config(args), etcd=args.etcd,
        cluster=args.cluster, static=static, node_id=args.node_id, advertise=args.advertise_host,
        kernels=args.kernels, dispatch_timeout_s=args.dispatch_timeout, max_pending=args.max_pending,
        tls=TLSFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca), health_port=args.health_port,
        transport=args.transport))
    return 0


def _cmd_tiny(args: argparse.Namespace) -> int:
    from moemesh.model.tiny import write_tiny_checkpoint

    if args.shared_experts < 0:
        raise UsageError(f"--shared-experts must be >= 0, got {args.shared_experts}")
    if args.experts_per_token > args.experts:
        raise UsageError(f"--experts-per-token ({args.experts_per_token}) exceeds --experts ({args.experts})")
    path = write_tiny_checkpoint(
        args.dir, arch=args.arch, seed=args.seed, hidden_size=args.hidden_size, layers=args.layers,
        experts=args.experts, experts_per_token=args.experts_per_token, shared_experts=args.shared_experts,
        kv_lora_rank=args.kv_lora_rank, vocab_size=args.vocab_size, dtype=args.dtype,
    )
    print(json.dumps({"path": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
