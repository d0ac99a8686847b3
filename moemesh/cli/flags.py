"""Arguments shared by several commands, and the parser class every command uses.

A usage error is one line (what is wrong, and where to look) and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse

from moemesh.argtypes import positive_float, positive_int, seed
from moemesh.devices import DEVICE_HELP, DTYPE_CHOICES, FP8_MODES, device_arg
from moemesh.errors import MoemeshError
from moemesh.wire.limits import DEFAULT_MAX_BATCHED_TOKENS

EXIT_USAGE = 2


class UsageError(MoemeshError):
    """A command-line argument is wrong; the message says which and why."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, and where to look), exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


class OrderedPrompts(argparse.Action):
    """--prompt and --prompt-ids share one list so prompts keep the order they were given in."""

    def __call__(self, parser, namespace, values, option_string=None):
        prompts = list(getattr(namespace, "prompts", None) or [])
        prompts.append(("ids", values) if option_string == "--prompt-ids" else ("text", values))
        namespace.prompts = prompts


def add_model_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--model",
        required=required,
        metavar="DIR",
        help="HF-format DeepSeek-V2/V3 checkpoint directory (config.json, *.safetensors, optional tokenizer.json)"
        + ("" if required else "; default: a tiny random demo checkpoint, written on first use"),
    )


def add_router_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", required=True, metavar="HOST:PORT", help="the router's client address")
    p.add_argument("--token-file", metavar="F", help="file holding the bearer token the router requires")
    p.add_argument("--tls-ca", metavar="F", help="CA certificate to verify the router (turns TLS on)")
    p.add_argument("--tls-cert", metavar="F", help="client certificate, for a router requiring mTLS")
    p.add_argument("--tls-key", metavar="F", help="client private key, for a router requiring mTLS")
    p.add_argument("--timeout", type=positive_float, default=300.0, help="seconds for the whole call (default: 300)")


def add_sampling_args(p: argparse.ArgumentParser, *, several_prompts: bool) -> None:
    """The prompt and sampling flags of ``generate`` (several prompts) and ``query`` (one)."""
    more = " (repeatable)" if several_prompts else ""
    p.add_argument("--prompt", action=OrderedPrompts, metavar="TEXT", help="a text prompt" + more)
    p.add_argument("--prompt-ids", action=OrderedPrompts, type=token_ids, metavar="IDS",
                   help="a prompt as comma-separated token ids, e.g. 1,2,3" + more)
    p.add_argument("--max-tokens", type=int, default=64,
                   help=f"tokens to generate{' per prompt' if several_prompts else ''} at most (default: 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default: 0 = off)")
    p.add_argument("--seed", type=seed, default=None,
                   help="seed for sampling" + ("; prompt i uses seed + i" if several_prompts else ""))
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def add_etcd_auth_args(p: argparse.ArgumentParser) -> None:
    """How to reach a secured etcd, on every command that takes ``--etcd`` (see :func:`etcd_credentials`)."""
    g = p.add_argument_group("secured etcd (TLS, auth)")
    g.add_argument("--etcd-ca", metavar="F", help="PEM CA that signed etcd's certificate: dial etcd over TLS")
    g.add_argument("--etcd-cert", metavar="F", help="PEM client certificate for an etcd requiring them (with "
                   "--etcd-key; dials TLS; with etcd auth and no password, its CN is the etcd user)")
    g.add_argument("--etcd-key", metavar="F", help="PEM private key of --etcd-cert")
    g.add_argument("--etcd-user", metavar="NAME", help="etcd auth user (with --etcd-password-file)")
    g.add_argument("--etcd-password-file", metavar="F",
                   help="file holding --etcd-user's password (never on the command line; never logged)")


def etcd_credentials(args: argparse.Namespace):
    """The ``--etcd-*`` flags as an :class:`~moemesh.control.etcd_credentials.EtcdCredentials`, None if none given.

    Files are read now, so a missing one is one line before anything starts (SecurityConfigError).
    """
    from moemesh.control.etcd_credentials import EtcdCredentials

    return EtcdCredentials.from_flags(ca=getattr(args, "etcd_ca", None), cert=getattr(args, "etcd_cert", None),
                                      key=getattr(args, "etcd_key", None), user=getattr(args, "etcd_user", None),
                                      password_file=getattr(args, "etcd_password_file", None))


def add_node_args(p: argparse.ArgumentParser, role: str) -> None:
    p.add_argument("--etcd", metavar="HOST:PORT", help="etcd endpoint: register there and follow the placement")
    add_etcd_auth_args(p)
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
    add_auth_tokens_arg(p)
    add_metrics_arg(p)


def add_auth_tokens_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--auth-tokens", metavar="F", help="'<role> <token>' lines: this process's servers accept these "
                   "tokens as those roles, and it sends its own role's token to the nodes it dials (docs/security.md)")


def add_metrics_arg(p: argparse.ArgumentParser) -> None:
    """--metrics-port and --health-port; both listen on the command's --host (every command with them has one)."""
    p.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help="serve Prometheus metrics at http://HOST:P/metrics, HOST being --host: reachable from "
                   "outside only with --host 0.0.0.0 (default: off)")
    p.add_argument("--health-port", type=int, default=None, metavar="P",
                   help="also serve grpc.health.v1 alone, in plaintext, on --host:P: for probes that cannot do "
                   "(m)TLS, such as Kubernetes' native gRPC probes (default: off)")


TRANSPORTS = ("grpc", "torch")


def add_transport_arg(p: argparse.ArgumentParser, role: str) -> None:
    help_text = {
        "attn": "how routed-expert rows travel: grpc (Dispatch streams) or torch (a torch.distributed group per "
                "expert node, NCCL on CUDA, a TCP stream of the same frames on CPU, with gRPC as the fallback; the expert nodes must run "
                "--transport torch too, else their rows go over gRPC) (default: grpc)",
        "expert": "torch: also serve TorchTransport sessions (a torch.distributed group per attention node; "
                  "Dispatch stays the fallback) (default: grpc)",
        "up": "the expert transport of every attention and expert node (default: grpc)",
        "bench": "torch: also measure the torch transport, side by side with gRPC in the same run (--mesh) "
                 "(default: grpc)",
    }[role]
    p.add_argument("--transport", default="grpc", choices=TRANSPORTS, help=help_text)


def add_device_args(p: argparse.ArgumentParser, what: str = "compute") -> None:
    """--device, --dtype and --fp8: where weights, the latent cache and the experts live, and in what."""
    p.add_argument("--device", type=device_arg, default="auto", metavar="DEV",
                   help=f"where weights, the latent cache and the routed experts live: {DEVICE_HELP} "
                   "(default: auto)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help=f"{what} dtype of the weights; auto = the checkpoint's. On CPU, bfloat16/float16 weights stay "
                   "half-size in memory while activations run in float32 (tokens as an fp32 run of the same "
                   "checkpoint); float32 upcasts the weights at load (default: auto)")
    p.add_argument("--fp8", default="auto", choices=FP8_MODES,
                   help="FP8 block-quantized checkpoints (DeepSeek-V3's layout): keep = routed experts stay e4m3 "
                   "with their block scales (half the bytes of bf16; the FP8 fused-MoE kernel on CUDA, the C "
                   "kernels on CPU, else a slow per-call dequantization); dequant = convert them to --dtype at "
                   "load; auto = keep where a kernel runs them (CUDA, or CPU with the C kernels built), else "
                   "dequant (default: auto)")


def add_prefix_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not share cached prompt blocks between requests (by default a prompt whose leading "
                   "full blocks are in the latent cache prefills only the rest)")


def micro_batches_arg(text: str) -> int | str:
    """--micro-batches: ``auto`` or a positive integer."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"give auto or a positive integer: {exc}") from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    add_device_args(p)
    p.add_argument("--kv-cache-tokens", type=positive_int, default=32768,
                   help="latent KV cache capacity in tokens, shared by all sequences (default: 32768)")
    p.add_argument("--block-size", type=positive_int, default=16, help="KV cache block size in tokens (default: 16)")
    p.add_argument("--max-num-seqs", type=positive_int, default=64,
                   help="sequences in the running batch at most (default: 64)")
    p.add_argument("--max-batched-tokens", type=positive_int, default=DEFAULT_MAX_BATCHED_TOKENS,
                   help="tokens computed per step at most; longer prompts are prefilled in chunks. Expert nodes "
                   "take steps up to their own --max-batched-tokens in one message; larger ones are split "
                   f"(default: {DEFAULT_MAX_BATCHED_TOKENS})")
    add_prefix_cache_arg(p)
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "reference"],
                   help="auto = Triton kernels on CUDA, plain-torch references on CPU; triton forces the kernels "
                   "(on CPU set TRITON_INTERPRET=1 to run them in Triton's interpreter, slowly) (default: auto)")
    p.add_argument("--micro-batches", type=micro_batches_arg, default="auto", metavar="auto|N",
                   help="split each step into N micro-batches run in ping-pong, so one's attention overlaps "
                   "another's remote experts; auto = measure attention, hop and expert times per layer and split "
                   "only when the hidden time exceeds what splitting costs (a second pass over the expert "
                   "weights, a second hop), re-decided per batch size; always 1 with local experts "
                   "(default: auto)")


def add_threads_arg(p: argparse.ArgumentParser, what: str, default: str | None = None) -> None:
    """--threads: torch's intra-op threads, the cores a CPU node streams its weights with."""
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help=f"torch intra-op threads for {what} (torch.set_num_threads). On a CPU node these are the "
                   "cores that stream the weights: one per physical core of its memory domain is usually best "
                   "(measure with `moemesh bench --json`: stream_gbps, roofline_fraction). Inter-op threads are "
                   "left alone: inference runs one op at a time "
                   f"(default: {default or 'what torch picks: OMP_NUM_THREADS when set, else the physical cores'})")


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op threads when ``--threads`` was given; leave torch's choice otherwise."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
