"""``moemesh status``: nodes, placement and loads of a running mesh, from its router."""

from __future__ import annotations

import argparse
import json

from moemesh.cli import flags
from moemesh.control.placement import describe_exposure, loss_exposure
from moemesh.cli.query import client_for, fail
from moemesh.router import MeshError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("status", help="nodes, placement and loads of a running mesh",
                              description="Ask a router for the cluster status: every node (role, address, status, "
                              "experts or load) and the placement version.")
    flags.add_router_client_args(p)
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        with client_for(args) as client:
            status = client.cluster_status()
    except MeshError as exc:
        return fail("status", exc)
    if args.json:
        print(json.dumps({**status, "expert_node_loss": expert_node_loss(status), "zone_loss": zone_loss(status)}))
        return 0
    print(format_status(status))
    return 0


def format_status(status: dict) -> str:
    """Placement (version; DEGRADED/UNSERVABLE and why; why planned, moves, balancedness per layer), then one
    line per node with its load."""
    lines = [f"placement version {status.get('placement_version', 0)}; leader {status.get('leader') or '-'}"]
    if status.get("mesh_state") in ("degraded", "unservable"):  # experts without a live replica (servability.py)
        lines.append(f"  mesh {status['mesh_state'].upper()}: {status.get('mesh_problem', '')}")
    if status.get("placement_reason"):
        window = int(status.get("window_tokens", 0))
        lines.append(f"  planned because: {status['placement_reason']}; moved {status.get('moved', 0)} replicas; "
                     f"load window {window} routed tokens" + (" (no traffic yet: even spread)" if not window else ""))
    balance = status.get("balance") or []
    if balance:
        worst = min(b["balancedness"] for b in balance)
        per_layer = " ".join(f"{b['layer']}:{b['balancedness']:.3f}" for b in balance)
        lines.append(f"  balancedness (mean/max node load) worst {worst:.3f}; by layer {per_layer}")
    if any(n.get("role") == "expert" for n in status.get("nodes", [])):
        lines.append(f"  one expert-node loss: {expert_node_loss(status)}")
    zones = zone_loss(status)
    if zones is not None:
        lines.append(f"  one zone loss: {zones}")
    lines.extend(f"  warning: {w}" for w in status.get("zone_warnings") or [])  # the planner's check (zone_status.py)
    computed = sum(int(n.get("tokens_computed", 0)) for n in status.get("nodes", []) if n.get("role") == "expert")
    for node in status.get("nodes", []):
        if node.get("role") == "attn":
            load = (f"running {node.get('running', 0)}, waiting {node.get('waiting', 0)}, "
                    f"cache free {float(node.get('cache_free', 0)):.0%}, {prefix_cache_line(node)}")
            if int(node.get("micro_batches", 0)):
                load += f", micro-batches {node['micro_batches']}"
        else:
            experts = sum(len(le.get("experts", [])) for le in node.get("experts", []))
            tokens = int(node.get("tokens_computed", 0))
            share = f" ({tokens / computed:.1%})" if computed else ""
            zone = f"zone {node['zone']}, " if node.get("zone") else ""
            load = f"{zone}{experts} experts, {load_line(node)}, computed {tokens} routed tokens{share}"
            if int(node.get("hop_samples", 0)):  # the attention nodes' last window (router/hop_status.py)
                load += (f", hop p50 {float(node['hop_p50_us']):.0f} us p99 {float(node['hop_p99_us']):.0f} us "
                         f"(compute p50 {float(node['compute_p50_us']):.0f} us)"
                         + (" STRAGGLER: hop p99 well above its peers'" if node.get("hop_straggler") else ""))
        lines.append(f"  {node.get('role', '?'):6} {node.get('id', '?'):24} {node.get('address', '?'):22} "
                     f"{node.get('status', '?'):9} v{node.get('placement_version', 0):<4} {load}")
    return "\n".join(lines)


def load_line(node: dict) -> str:
    """An expert node's planned share of the routed tokens, and the one applied when stragglers got less."""
    planned = float(node.get("planned_load", 0))
    applied = float(node.get("applied_load", planned))
    if abs(applied - planned) < 5e-4:  # equal as printed: one figure
        return f"planned load {planned:.1%}"
    return f"planned load {planned:.1%} (applied {applied:.1%}: stragglers given less)"


def zone_loss(status: dict) -> str | None:
    """Whether losing any one zone leaves every expert a replica in another, from what the ready expert nodes
    serve now: ``survivable (zones a, b)``, ``NOT survivable (losing zone a would lose ...)``; None when no
    expert node names a zone. A node without a zone is a zone of its own, as the planner counts it."""
    serving = [n for n in status.get("nodes", []) if n.get("role") == "expert" and n.get("status") == "ready"]
    if not any(n.get("zone") for n in serving):
        return None
    by_zone: dict[str, dict[int, list[int]]] = {}
    for n in serving:
        zone = by_zone.setdefault(f"zone {n['zone']}" if n.get("zone") else f"node {n.get('id', '?')}", {})
        for le in n.get("experts", []):
            zone.setdefault(int(le.get("layer", 0)), []).extend(le.get("experts", []))
    if len(by_zone) == 1:
        return f"NOT survivable (every serving expert node is in {next(iter(by_zone))})"
    verdict = describe_exposure(loss_exposure(by_zone))
    return f"{verdict} ({', '.join(sorted(by_zone))})" if verdict == "survivable" else verdict


def prefix_cache_line(node: dict) -> str:
    """An attention node's prefix cache: prompt tokens served from it, of all prompt tokens (the hit rate)."""
    prompt, hit = int(node.get("prompt_tokens", 0)), int(node.get("prefix_hit_tokens", 0))
    rate = f" ({hit / prompt:.1%})" if prompt else ""
    return (f"prefix hits {hit}/{prompt} prompt tokens{rate}, {int(node.get('cached_blocks', 0))} cached blocks, "
            f"{int(node.get('evicted_blocks', 0))} evicted")


def expert_node_loss(status: dict) -> str:
    """Whether losing any one serving expert node leaves every expert it hosts a replica on another, from what
    the nodes serve now: ``survivable`` or ``NOT survivable (losing N would lose layer L: experts ...)``."""
    serving = {n.get("id", "?"): {int(le.get("layer", 0)): le.get("experts", []) for le in n.get("experts", [])}
               for n in status.get("nodes", []) if n.get("role") == "expert" and n.get("status") == "ready"}
    return describe_exposure(loss_exposure(serving))
