"""``moemesh bench --mesh``: the single process against the mesh (2 expert node processes), in one run.

Reports tokens/s of the single process and of the mesh with micro-batch overlap
on (2, or ``--micro-batches N``), off, and ``auto`` (what the engine chose, step by step), and the round trip of one dispatch message (a decode step's rows for
one node) against a raw TCP echo of the same number of bytes on loopback (the gRPC message's size; the
torch frames are within a few percent of it each way), timed in alternating rounds so that both see the
same load, each figure its quickest round's median and the echo the quickest of the whole run; beside them the
kernel's floors for the same bytes (``moemesh/wire/tcp_floor.py``: C ping-pongs, spinning on two cores as the
tcp stream does, and blocking on one core as the echo usually runs), the physical limit of each. With
``--transport torch`` the expert nodes serve both transports and every figure of
the mesh is measured for gRPC and for torch.distributed side by side.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import NamedTuple

import torch

from moemesh.attn_node.experts.remote_backend import NodeLink
from moemesh.attn_node.experts.torch_link import TorchLink
from moemesh.sampling import SamplingParams
from moemesh.logs import get_logger
from moemesh.wire import tcp_floor
from moemesh.wire.codec import to_proto
from moemesh.cli.generate import engine_config
from moemesh.launch.embedded import build_local, build_remote
from moemesh.launch.procs import spawn_expert_nodes
from moemesh.v1 import dispatch_pb2

log = get_logger("moemesh.bench.mesh")

ECHO_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(1); print(s.getsockname()[1], flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = bytearray(1 << 20); view = memoryview(buf)
while (n := c.recv_into(buf)):
    c.sendall(view[:n])
"""
# recv_into a buffer made once, on both ends: recv(1 << 20) allocates a MiB per call, which cost 15-30 us per
# round trip here (the echo measured 25-45 us at 1131 B instead of ~10 us): an echo slowed by its own allocator.


def _tokens_per_s(engine, prompts, params) -> tuple[float, list[list[int]]]:
    engine.generate(prompts, replace(params, max_tokens=2))  # warm-up
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    return len(prompts) * params.max_tokens / (time.perf_counter() - start), [o.token_ids for o in outs]


HOP_ROUNDS = 5  # hop and echo timed in alternating rounds; each figure is its quickest round's median


def _hop_message(layer: int, rows: int, hidden: int, k: int, expert: int):
    """One Dispatch message's tensors and its size as a gRPC message; expert -1 = transport only (the node
    computes nothing)."""
    x = torch.randn(rows, hidden)
    idx = torch.full((rows, k), expert, dtype=torch.int64)
    w = torch.full((rows, k), 1.0 / k)
    size = dispatch_pb2.DispatchRequest(layer=layer, hidden=to_proto(x), topk_idx=to_proto(idx),
                                        topk_weights=to_proto(w)).ByteSize()
    return (layer, x, idx, w), size


def _hop_round(link: NodeLink, message: tuple, n: int) -> float:
    """Median round trip (us) of ``n`` sends of one message, after a few untimed ones."""
    layer, x, idx, w = message
    for _ in range(max(2, n // 10)):
        link.send(layer, x, idx, w, 0).result(timeout=30)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        link.send(layer, x, idx, w, 0).result(timeout=30)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


class _Echo:
    """A raw TCP echo on loopback: a plain Python process that sends back what it reads (the expert node is a
    Python process too), timed from this one as the hop is: ``sendall`` then ``recv`` until all is back."""

    def __init__(self):
        self.server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
        try:
            port = int(self.server.stdout.readline())
            self.sock = socket.create_connection(("127.0.0.1", port))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            self.server.kill()
            raise

    def round(self, nbytes: int, n: int) -> float:
        payload, buf, times = b"x" * nbytes, bytearray(1 << 20), []
        for _ in range(max(2, n // 10) + n):
            start = time.perf_counter()
            self.sock.sendall(payload)
            got = 0
            while got < nbytes:
                got += self.sock.recv_into(buf)
            times.append(time.perf_counter() - start)
        return statistics.median(times[max(2, n // 10):]) * 1e6

    def close(self) -> None:
        self.sock.close()
        self.server.kill()
        self.server.wait()


class Floors(NamedTuple):
    """The kernel's floors for the hop's bytes (moemesh/wire/tcp_floor.py), each the quickest round's median (us):
    C ping-pongs spinning on two cores (the tcp stream's mode) and blocking on one core (a blocking echo's when
    the scheduler keeps it beside its client); inf where they could not be measured (:func:`_floor`)."""

    spin_us: float
    one_core_us: float


def _hops_and_echo(link: NodeLink, echo: _Echo, shape: tuple, n: int) -> tuple[float, float, float, int, Floors]:
    """(hop us, hop with one expert's work us, echo us, bytes, floors): hop, echo and the C floors of the same bytes
    in alternating rounds under the same load, each the quickest round's median (a busy machine slows some rounds
    of any)."""
    transport, nbytes = _hop_message(*shape, expert=-1)
    work, _ = _hop_message(*shape, expert=0)
    per_round = max(1, n // HOP_ROUNDS)
    hop = hop_work = echo_us = spin = one_core = float("inf")
    for _ in range(HOP_ROUNDS):
        hop = min(hop, _hop_round(link, transport, per_round))
        echo_us = min(echo_us, echo.round(nbytes, per_round))
        spin = min(spin, _floor(nbytes, per_round, spin=True))
        one_core = min(one_core, _floor(nbytes, per_round, spin=False, one_core=True))
        hop_work = min(hop_work, _hop_round(link, work, per_round))
    return hop, hop_work, echo_us, nbytes, Floors(spin, one_core)


def _mesh_run(args, econf, node_list, transport: str, micro_batches: int | str, prompts, params):
    mesh = build_remote(args.model, node_list, args.dtype, replace(econf, micro_batches=micro_batches), False,
                        kernels=args.kernels, transport=transport, device=args.device)
    try:
        if transport == "torch":
            for link in mesh.remote.links:
                if not link.wait_ready(60):
                    raise RuntimeError(f"torch transport to {link.address} did not come up: {link.pair.failure}")
        tps, tokens = _tokens_per_s(mesh.engine, prompts, params)
        fallbacks = sum(getattr(link, "fallback_messages", 0) for link in mesh.remote.links)
        return tps, tokens, fallbacks, dict(getattr(mesh.engine.micro, "steps_by_m", {}))
    finally:
        mesh.close()


def _floor(nbytes: int, rounds: int, **mode) -> float:
    """One round of the kernel's floor (us); inf when it cannot be measured here (no compiler: logged once by
    tcp_floor; a socket error: logged here), so the bench's other figures still come."""
    try:
        got = tcp_floor.floor_us(nbytes, rounds, **mode)
    except OSError as exc:
        log.warning("tcp_floor_failed", error=str(exc), **mode)
        return float("inf")
    return float("inf") if got is None else got


def _measured(us: float) -> float | None:
    return None if us == float("inf") else us


def _ratio(a: float, b: float | None) -> float | None:
    return None if b is None else a / b


def _steps(by_m: dict[int, int]) -> dict[str, int]:
    """Steps run per micro-batch setting (probes included), keys as text for JSON: {"1": 30, "2": 2}."""
    return {str(m): n for m, n in sorted(by_m.items())}


def _link(transport: str, address: str, hidden_size: int):
    if transport == "grpc":
        return NodeLink(address)
    link = TorchLink(address, hidden_size=hidden_size)
    if not link.wait_ready(60):
        link.close()
        raise RuntimeError(f"torch transport to {address} did not come up: {link.pair.failure}")
    return link


def run_mesh_bench(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    econf = engine_config(args)
    local = build_local(args.model, args.dtype, replace(econf, micro_batches=1), progress=False, kernels=args.kernels,
                        device=args.device, fp8=args.fp8)
    cfg = local.cfg
    half = cfg.n_routed_experts // 2
    specs = [f"0-{half - 1}", f"{half}-{cfg.n_routed_experts - 1}"]
    prompts = torch.randint(2, cfg.vocab_size, (args.batch, args.prompt_len),
                            generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    transports = ["grpc"] if getattr(args, "transport", "grpc") == "grpc" else ["grpc", args.transport]
    extra = [] if transports == ["grpc"] else ["--transport", "torch"]  # such nodes serve both
    extra += ["--device", args.device, "--dtype", args.dtype, "--fp8", args.fp8]  # the experts where attention is
    extra += ["--max-batched-tokens", str(args.max_batched_tokens)]  # steps in one message, as in a mesh
    with tempfile.TemporaryDirectory() as logs:
        nodes = spawn_expert_nodes(args.model, specs, log_dir=logs, extra_args=extra)
        try:
            node_list = [(n.address, n.spec) for n in nodes]
            local_tps, local_tokens = _tokens_per_s(local.engine, prompts, params)
            results, hops = {}, {}
            # Three processes now share this machine's cores: one torch thread each, or OpenMP
            # workers of different processes stall each other (measured: tiny ops took milliseconds).
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                split = args.micro_batches if isinstance(args.micro_batches, int) and args.micro_batches >= 2 else 2
                echo = _Echo()
                try:
                    for transport in transports:
                        for overlap, m in (("on", split), ("off", 1), ("auto", "auto")):
                            results[transport, overlap] = _mesh_run(args, econf, node_list, transport, m, prompts,
                                                                    params)
                        link = _link(transport, nodes[0].address, cfg.hidden_size)
                        try:
                            shape = (cfg.moe_layers[0], args.batch, cfg.hidden_size, cfg.num_experts_per_tok)
                            hops[transport] = _hops_and_echo(link, echo, shape, args.hop_samples)
                        finally:
                            link.close()
                finally:
                    echo.close()
            finally:
                torch.set_num_threads(threads)
        finally:
            for node in nodes:
                node.stop()
    nbytes = hops["grpc"][3]
    echo = min(h[2] for h in hops.values())  # the quickest echo round of the whole run
    # likewise; None from here on where a floor was not measured
    floors = Floors(*(_measured(min(h[4][i] for h in hops.values())) for i in range(2)))
    grpc_on, grpc_off = results["grpc", "on"][0], results["grpc", "off"][0]
    out = {
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "expert_nodes": specs, "transports": transports, "device": str(local.device),
        "engine_tokens_per_s": local_tps,
        "mesh_tokens_per_s": grpc_on,
        "mesh_no_overlap_tokens_per_s": grpc_off,
        "mesh_auto_tokens_per_s": results["grpc", "auto"][0],
        "mesh_auto_steps_by_micro_batches": _steps(results["grpc", "auto"][3]),
        "mesh_vs_engine": grpc_on / local_tps,
        "tokens_match": all(r[1] == local_tokens for r in results.values()),
        "hop_us": hops["grpc"][0], "tcp_echo_us": echo, "hop_vs_tcp_echo": hops["grpc"][0] / echo, "hop_bytes": nbytes,
        "hop_with_expert_us": hops["grpc"][1],
        # the kernel's floors for these bytes (C, no Python): the hop's own mode, and a blocking echo's on one core
        "tcp_floor_spin_us": floors.spin_us, "tcp_floor_one_core_us": floors.one_core_us,
        "hop_vs_tcp_floor": _ratio(hops["grpc"][0], floors.spin_us),
    }
    if "torch" in transports:
        out.update({
            "torch_mesh_tokens_per_s": results["torch", "on"][0],
            "torch_mesh_no_overlap_tokens_per_s": results["torch", "off"][0],
            "torch_mesh_auto_tokens_per_s": results["torch", "auto"][0],
            "torch_mesh_auto_steps_by_micro_batches": _steps(results["torch", "auto"][3]),
            "torch_hop_us": hops["torch"][0], "torch_hop_with_expert_us": hops["torch"][1],
            "torch_hop_vs_tcp_echo": hops["torch"][0] / echo,
            "torch_hop_vs_tcp_floor": _ratio(hops["torch"][0], floors.spin_us),
            "torch_fallback_messages": sum(results["torch", o][2] for o in ("on", "off", "auto")),
        })
    from moemesh.cli.bench import emit_json

    if emit_json(args, out):
        return 0
    print(f"workload: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy; "
          f"2 expert nodes ({specs[0]} | {specs[1]}) on loopback")
    print(f"{'':30}{'tokens/s':>10}{'vs single':>11}")
    print(f"{'single process':30}{local_tps:10.1f}{1.0:10.2f}x")
    for transport in transports:
        for overlap in ("on", "off", "auto"):
            tps = results[transport, overlap][0]
            label = f"mesh {transport}, overlap {split if overlap == 'on' else overlap}"
            chose = f"  steps by micro-batches: {_steps(results[transport, overlap][3])}" if overlap == "auto" else ""
            print(f"{label:30}{tps:10.1f}{tps / local_tps:10.2f}x{chose}")
    print(f"identical tokens: {'yes' if out['tokens_match'] else 'NO'}")
    print(f"dispatch hop ({nbytes} B of gRPC message, {args.batch} rows; raw TCP echo of the same bytes: {echo:.0f} us):")
    if floors.spin_us is not None:
        print(f"  the kernel's floor for these bytes (C ping-pong, no Python): {floors.spin_us:.0f} us spinning on two "
              f"cores (the tcp stream's mode), {floors.one_core_us:.0f} us blocking on one core")
    for transport in transports:
        hop, hop_compute = hops[transport][:2]
        floor = f", {hop / floors.spin_us:.2f}x the spinning floor" if floors.spin_us else ""
        print(f"  {transport:5} no expert work: {hop:7.0f} us ({hop / echo:.2f}x echo{floor}); with one expert's "
              f"work: {hop_compute:7.0f} us")
    if "torch" in transports and out["torch_fallback_messages"]:
        print(f"note: {out['torch_fallback_messages']} torch messages fell back to gRPC")
    return 0
