"""``moemesh profile``: measure on this machine the costs the cluster model needs (``moemesh/cluster_model.py``).

    moemesh profile --model DIR [--batches 1,8,32,64] [--contexts 32,256] [--steps S] [--repeats R]
                    [--threads N] [--transport T] [--json]

* attention time per layer vs batch and context: the single-process engine's decode step (the median of single
  steps over ``--repeats`` runs), less its routed experts (timed inside its expert backend), over the layers:
  everything an attention node does per layer;
* expert time per MoE layer vs rows: the routed experts of those decode steps (every expert in the process);
* hop latency and bandwidth vs bytes: one Dispatch round trip to an expert node process on loopback with no
  expert work (``bench --mesh``'s machinery), per transport, and the share of it the sending process's CPU is
  busy (its ``process_time``: serialisation and gRPC threads), which an attention node cannot overlap;
* MoE-layer round trips vs rows through the mesh's own backend to both nodes computing their rows, with the CPU
  seconds every process spent on one (``moemesh/cli/profile_remote.py``): ``plan --cluster --shared-host``.

``--json`` prints the profile ``moemesh plan --cluster --profile FILE`` reads. ``--threads 1`` measures as
``moemesh bench --mesh`` runs the mesh (one torch thread per process).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import replace

from moemesh.argtypes import positive_int
from moemesh.errors import FailedPreconditionError
from moemesh.cli import flags


def _ints(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile", help="measure the costs `moemesh plan --cluster` models a mesh with",
                              description="Measure attention time per layer vs batch and context, routed-expert "
                              "time per MoE layer vs rows, and dispatch round trips vs bytes on each transport, on "
                              "this machine, with this model. Starts one expert node process on loopback.")
    flags.add_model_arg(p)
    p.add_argument("--batches", type=_ints, default=[1, 8, 32, 64], metavar="B,B,...",
                   help="decode batches timed (default: 1,8,32,64)")
    p.add_argument("--contexts", type=_ints, default=[32, 256], metavar="C,C,...",
                   help="context lengths (prompt tokens) timed (default: 32,256)")
    p.add_argument("--steps", type=positive_int, default=8, help="decode steps timed per point (default: 8)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="runs per point, taken round all the points in turn; the quickest counts (default: 3)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads while measuring (default: torch's; 1 = as `bench --mesh` runs the mesh)")
    p.add_argument("--hop-samples", type=positive_int, default=100, help="round trips timed per hop size")
    flags.add_transport_arg(p, "bench")
    flags.add_device_args(p)
    p.add_argument("--json", action="store_true", help="print the profile as one JSON object")
    return p


class _TimedBackend:
    """Wraps the engine's expert backend: the time spent in dispatch and combine for decode steps, and a mark at
    each decode step's first MoE layer (when it began, routed-expert seconds so far): one sample per step."""

    def __init__(self, inner, first_layer: int):
        self.inner, self.first_layer = inner, first_layer
        self.rows = None  # only steps of this many rows count (the decode steps)
        self.total_s = 0.0
        self.marks: list[tuple[float, float]] = []

    def dispatch(self, layer_id, x, topk_idx, topk_weights):
        start = time.perf_counter()
        if layer_id == self.first_layer and x.shape[0] == self.rows:
            self.marks.append((start, self.total_s))
        handle = self.inner.dispatch(layer_id, x, topk_idx, topk_weights)
        self._count(x.shape[0], start)
        return handle, x.shape[0]

    def combine(self, handle):
        inner, rows = handle
        start = time.perf_counter()
        y = self.inner.combine(inner)
        _sync(y)
        self._count(rows, start)
        return y

    def _count(self, rows: int, start: float) -> None:
        if rows == self.rows:
            self.total_s += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _sync(t) -> None:
    if t.device.type != "cpu":
        import torch

        torch.accelerator.synchronize(t.device)


def step_samples(marks: list[tuple[float, float]], prompt_len: int = 2) -> list[tuple[float, float]]:
    """(step seconds, routed-expert seconds in it) between consecutive decode steps' marks.

    A step is marked by its row count (the batch), so with one-token prompts the prefill is marked too: its
    mark is the first, and its sample is dropped."""
    samples = [(t1 - t0, e1 - e0) for (t0, e0), (t1, e1) in zip(marks, marks[1:])]
    return samples[1:] if prompt_len == 1 else samples


def _decode_run(mesh, timed, prompts, n: int) -> list[tuple[float, float]]:
    """One generate of ``n`` tokens: :func:`step_samples` of its decode steps."""
    from moemesh.sampling import SamplingParams

    timed.rows, timed.total_s, timed.marks = len(prompts), 0.0, []
    mesh.engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    return step_samples(timed.marks, len(prompts[0]))


def _decode_points(mesh, timed, cfg, points: list[tuple[int, int]], steps: int, repeats: int
                   ) -> dict[tuple[int, int], tuple[float, float]]:
    """{(batch, context): (decode step us, routed-expert us per MoE layer)}: medians over every decode step of
    every repeat, each step timed from its first MoE layer to the next step's (the prefill is no sample).

    The repeats go round the points (every point once, then again), and the median of many single steps
    holds against a neighbour that takes the cores now and then, where a difference of two runs' totals took
    the whole of any stall in either run (seen: one point 10x below its neighbours)."""
    import statistics

    import torch

    prompts = {(b, c): torch.randint(2, cfg.vocab_size, (b, c), generator=torch.Generator().manual_seed(0)).tolist()
               for b, c in points}
    samples: dict[tuple[int, int], list[tuple[float, float]]] = {point: [] for point in points}
    for point in points:
        _decode_run(mesh, timed, prompts[point], 2)  # warm-up: first-call allocations of this shape
    for _ in range(repeats):
        for point in points:
            samples[point] += _decode_run(mesh, timed, prompts[point], 2 + steps)
    for (b, c), got in samples.items():
        if not got:  # the engine never ran all b sequences in one decode step
            raise FailedPreconditionError(f"batch {b}, context {c}: no decode step held all {b} sequences, so "
                                          "none could be timed (the engine's cache or batch limits split them)")
    n_moe = len(cfg.moe_layers)
    return {point: (statistics.median(s for s, _ in got) * 1e6, statistics.median(e for _, e in got) / n_moe * 1e6)
            for point, got in samples.items()}


def _fanout_us(links, layer: int, rows: int, hidden: int, k: int, samples: int) -> float:
    """Median time to send one message of ``rows`` rows to every link at once and have every reply (the
    expert nodes compute nothing: expert id -1), as an attention node does at each MoE layer."""
    import statistics

    import torch

    x, idx, w = torch.randn(rows, hidden), torch.full((rows, k), -1, dtype=torch.int64), torch.full((rows, k), 1 / k)
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for fut in [link.send(layer, x, idx, w, 0) for link in links]:
            fut.result(timeout=30)
        times.append(time.perf_counter() - start)
    return statistics.median(times[samples // 10:]) * 1e6


def _hop_point(links, cfg, rows: int, nbytes: float, samples: int) -> dict:
    """One message size: the round trip to one expert node and to two at once, and the share of the latter
    this process's CPU was busy (serialising, gRPC threads): what an attention node cannot overlap."""
    args = (cfg.moe_layers[0], rows, cfg.hidden_size, cfg.num_experts_per_tok, samples)
    one = _fanout_us(links[:1], *args)
    cpu, wall = time.process_time(), time.perf_counter()
    two = _fanout_us(links, *args)
    busy = (time.process_time() - cpu) / max(1e-9, time.perf_counter() - wall)
    return {"rows": rows, "bytes": nbytes, "us": one, "two_nodes_us": two, "busy": min(1.0, busy)}


def _hops(args, cfg, batches, act_bytes, device) -> tuple[dict, dict]:
    """Round trips per transport to two expert node processes on loopback (as ``bench --mesh`` starts): empty
    messages (the hop alone), and MoE layers whose rows the nodes compute (``profile_remote``)."""
    from moemesh.cli.profile_remote import round_trips
    from moemesh.cli.bench_mesh import _link
    from moemesh.cluster_model import ModelShape
    from moemesh.launch.procs import spawn_expert_nodes

    transports = ["grpc"] if args.transport == "grpc" else ["grpc", args.transport]
    extra = [] if transports == ["grpc"] else ["--transport", "torch"]
    shape = ModelShape(cfg.num_hidden_layers, len(cfg.moe_layers), cfg.hidden_size, cfg.num_experts_per_tok,
                       cfg.n_routed_experts, act_bytes)
    out, layers = {}, {}
    with tempfile.TemporaryDirectory() as logs:
        half = cfg.n_routed_experts // 2
        nodes = spawn_expert_nodes(args.model, [f"0-{half - 1}", f"{half}-{cfg.n_routed_experts - 1}"], log_dir=logs,
                                   extra_args=extra + ["--device", args.device, "--dtype", args.dtype])
        try:
            for transport in transports:
                links = [_link(transport, node.address, cfg.hidden_size) for node in nodes]
                try:
                    rows = sorted({max(1, b // 2) for b in batches} | set(batches))
                    out[transport] = [_hop_point(links, cfg, r, shape.dispatch_bytes(r), args.hop_samples)
                                      for r in rows]
                finally:
                    for link in links:
                        link.close()
                layers[transport] = round_trips(cfg, nodes, transport, rows, args.hop_samples, device)
        finally:
            for node in nodes:
                node.stop()
    return out, layers


def measure(args: argparse.Namespace) -> dict:
    import torch

    from moemesh.attn_node.engine import EngineConfig
    from moemesh.launch.embedded import build_local

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        longest = max(args.contexts) + args.steps + 4
        block = EngineConfig.block_size
        # every sequence of the largest batch in whole cache blocks at once: with fewer, some wait and the decode
        # steps timed hold fewer rows than the batch (then they are no samples: _TimedBackend counts by rows)
        econf = EngineConfig(max_num_seqs=max(args.batches),
                             kv_cache_tokens=max(args.batches) * (math.ceil(longest / block) + 1) * block,
                             max_num_batched_tokens=max(512, max(args.batches) * longest))
        mesh = build_local(args.model, args.dtype, econf, progress=False, device=args.device)
        cfg = mesh.cfg
        timed = _TimedBackend(mesh.engine.backend, cfg.moe_layers[0])
        for layer in mesh.engine.runner.model.moe_layers():
            layer.backend = timed
        attention, expert = [], {}
        points = [(batch, context) for context in args.contexts for batch in args.batches]
        measured = _decode_points(mesh, timed, cfg, points, args.steps, args.repeats)
        for batch, context in points:
            step_us, expert_us = measured[batch, context]
            if step_us <= len(cfg.moe_layers) * expert_us:
                print(f"moemesh profile: warning: batch {batch}, context {context}: the decode step measured "
                      f"{step_us:.0f} us, no more than its experts: the machine is noisy, raise --steps or "
                      "--repeats", file=sys.stderr)
            n_moe = len(cfg.moe_layers)
            attention.append({"batch": batch, "context": context,
                              "us": (step_us - n_moe * expert_us) / cfg.num_hidden_layers, "step_us": step_us})
            expert.setdefault(batch, []).append(expert_us)
        from moemesh.devices import compute_dtype

        # the wire carries activations: fp32 on CPU also over bf16 weights (moemesh/devices.py)
        act_bytes = torch.empty((), dtype=compute_dtype(mesh.dtype, mesh.device)).element_size()
        hops, layers = _hops(args, cfg, args.batches, act_bytes, mesh.device)
    finally:
        torch.set_num_threads(threads)
    return {
        "device": str(mesh.device), "dtype": str(mesh.dtype).removeprefix("torch."),
        "threads": args.threads or threads,
        "model": {"layers": cfg.num_hidden_layers, "moe_layers": len(cfg.moe_layers), "hidden": cfg.hidden_size,
                  "top_k": cfg.num_experts_per_tok, "experts": cfg.n_routed_experts, "act_bytes": act_bytes},
        "attention_us": attention,
        "expert_us": [{"rows": b, "us": sum(v) / len(v)} for b, v in sorted(expert.items())],
        "hop_us": hops,
        # one MoE layer's round trip to the 2 expert nodes computing their rows, and the CPU it took
        "round_trip_us": layers,
        "host_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        # work outside the layers (embedding, head, sampling) is counted in the layers' attention time
        "overhead_us": [{"batch": 1, "us": 0.0}],
    }


def run(args: argparse.Namespace) -> int:
    data = measure(args)
    if args.json:
        print(json.dumps(data))
        return 0
    print(f"profile on {data['device']} ({data['dtype']}, {data['threads']} threads)")
    for row in data["attention_us"]:
        print(f"  attention per layer, batch {row['batch']:4}, context {row['context']:5}: {row['us']:9.1f} us")
    for row in data["expert_us"]:
        print(f"  routed experts per MoE layer, {row['rows']:4} rows: {row['us']:9.1f} us")
    for transport, rows in data["hop_us"].items():
        for row in rows:
            print(f"  {transport} round trip, {row['rows']:4} rows ({row['bytes']:.0f} B): {row['us']:9.1f} us to one "
                  f"node, {row['two_nodes_us']:9.1f} us to two ({row['busy']:.0%} of it this process busy)")
    for transport, rows in data["round_trip_us"].items():
        for row in rows:
            nodes = f"{row['cpu_experts_us']:8.1f}" if "cpu_experts_us" in row else "       ?"
            print(f"  {transport} MoE layer to 2 computing nodes, {row['rows']:4} rows: {row['us']:9.1f} us (nodes' "
                  f"compute {row['node_compute_us']:7.1f} us); CPU per layer: this process "
                  f"{row['cpu_attention_us']:8.1f} us, expert nodes {nodes} us")
    print(f"  host cores: {data['host_cores']}")
    return 0
