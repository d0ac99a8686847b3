"""``moemesh profile``'s MoE-layer round trips with the expert nodes computing (``moemesh/cli/profile.py``).

A layer's rows go through the mesh's own expert backend (``RemoteExpertBackend``: routing tables, one message
per node, reply scatter) to the expert node processes, which compute their real rows: uniform top-k routing,
every node at once, as an attention node's MoE layer does. Per rows it records the median round trip, the
expert nodes' own compute per message (from their replies) and the CPU seconds every process spent per round
trip: this process (serialising, routing ops, gRPC threads) and the expert nodes (``/proc`` of their pids).
The round trip, timed with every process at work, is what ``cluster_model.predict`` takes for ``shared_host``;
the CPU seconds show where it goes (the empty-message hop, ``profile._hop_point``, sees neither).
"""

from __future__ import annotations

import os
import statistics
import time


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds of every thread of ``pid`` so far (``/proc/PID/task/*/schedstat``, ns); None off Linux."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended between the listing and the read
    return total * 1e-9


def routed_rows(cfg, rows: int, device, seed: int = 0):
    """``rows`` hidden rows with K distinct experts each, uniform (what a balanced router sends), and weights."""
    import torch

    g = torch.Generator().manual_seed(seed)
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    idx = torch.rand(rows, e, generator=g).argsort(dim=1)[:, :k]
    x, w = torch.randn(rows, cfg.hidden_size, generator=g), torch.full((rows, k), 1.0 / k)
    return x.to(device), idx.to(device), w.to(device)


def round_trip_point(backend, cfg, pids: list[int], rows: int, samples: int) -> dict:
    """One rows size: median round trip (dispatch + combine) of one MoE layer, the nodes' compute per message,
    and CPU microseconds per round trip of this process and of the expert node processes together."""
    from moemesh.attn_node.experts.hop_stats import HOPS

    x, idx, w = routed_rows(cfg, rows, backend.device)
    layer = cfg.moe_layers[0]
    backend.combine(backend.dispatch(layer, x, idx, w))  # warm-up: first-call allocations of this shape
    _, compute0, hops0 = HOPS.totals()
    cpu0, nodes0 = time.process_time(), [process_cpu_s(p) for p in pids]
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        backend.combine(backend.dispatch(layer, x, idx, w))
        times.append(time.perf_counter() - start)
    cpu1, nodes1 = time.process_time(), [process_cpu_s(p) for p in pids]
    _, compute1, hops1 = HOPS.totals()
    out = {"rows": rows, "us": statistics.median(times[samples // 10:]) * 1e6,
           "node_compute_us": (compute1 - compute0) / max(1, hops1 - hops0) * 1e6,
           "cpu_attention_us": (cpu1 - cpu0) / samples * 1e6}
    if None not in nodes0 + nodes1:
        out["cpu_experts_us"] = sum(b - a for a, b in zip(nodes0, nodes1)) / samples * 1e6
    return out


def round_trips(cfg, nodes, transport: str, rows: list[int], samples: int, device) -> list[dict]:
    """:func:`round_trip_point` for each of ``rows`` through a backend on ``device`` over ``transport`` to
    ``nodes`` (``launch.procs.NodeProcess``)."""
    from moemesh.attn_node.experts.remote_backend import RemoteExpertBackend
    from moemesh.attn_node.experts.torch_link import links_for
    from moemesh.control.placement import Placement, parse_expert_spec

    hosted = [(n.address, parse_expert_spec(n.spec, cfg.moe_layers, cfg.n_routed_experts)) for n in nodes]
    backend = RemoteExpertBackend(cfg, Placement.from_hosted(hosted),
                                  link_factory=links_for(transport, cfg.hidden_size, device=device), device=device)
    try:
        if transport == "torch":
            for link in backend.links:
                if not link.wait_ready(60):
                    raise RuntimeError(f"torch transport to {link.address} did not come up: {link.pair.failure}")
        pids = [n.proc.pid for n in nodes]
        return [round_trip_point(backend, cfg, pids, r, samples) for r in rows]
    finally:
        backend.close()
