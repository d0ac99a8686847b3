"""``moemesh plan``: plan an expert placement from per-layer expert loads (see ``moemesh.router.planner``).

The CLI adds the subcommand with :func:`add_parser` and runs it with :func:`run`::

    moemesh plan --loads LOADS.json --nodes N --slots-per-node S [--previous PLAN.json [--frontier]]
                 [--min-balance B] [--zones Z0,Z1,...] [--json]

LOADS.json is ``{"loads": [[load of expert e in layer l, ...] for each layer]}``. ``--json`` prints the plan
(``Plan.to_json``): ``"layers"``, each with ``"replicas"`` ``{"<expert id>": [{"node": i, "share": f}, ...]}``,
``"balancedness"``, ``"node_loads"``, ``"moved"`` (replicas placed on a node that did not hold them in
``--previous``; every replica without ``--previous``) and ``"kept_previous"``; top-level ``"moved"`` is the total
and ``"warnings"`` names the zones (``--zones``, one per node) whose loss would leave experts unhosted.
That output is a valid ``--previous`` of the next call. ``--frontier`` (with ``--previous``) prints instead the
trade-off between replicas moved and balancedness: one row per target (``FRONTIER_TARGETS`` and ``--min-balance``),
with the fewest moves reaching it, and the fresh plan for comparison; with ``--json``,
``{"frontier": [{"min_balance", "moved", "balancedness"}...], "fresh": {...}}``. Bad input: one line on stderr,
exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from moemesh.argtypes import unit_fraction
from moemesh.cli.plan_cluster import add_args as add_cluster_args

from moemesh.router.planner import (DEFAULT_MIN_BALANCE, Plan, PlanError, loads_from_json, plan_placement,
                                    previous_from_json)

EXIT_BAD_INPUT = 2
FRONTIER_TARGETS = (0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``plan`` to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "plan", help="plan expert replicas and shares on expert nodes from per-expert loads",
        description="Place every (layer, expert) on N expert nodes of S slots each: hot experts are replicated "
        "into spare slots and each replica's share of the expert's tokens is chosen so the most loaded node is "
        "as close to the mean as possible. With --previous, the plan moves the fewest replicas that reach "
        "--min-balance balancedness (mean / max node load per layer), none when changing shares suffices. "
        "Deterministic; reads files only, prints the plan.")
    p.add_argument("--loads", metavar="LOADS.json",
                   help='{"loads": [[load of expert e in layer l, ...] for each layer]}')
    p.add_argument("--nodes", type=int, metavar="N", help="expert nodes (>= 1)")
    p.add_argument("--slots-per-node", type=int, metavar="S",
                   help="experts a node can hold per MoE layer (>= 1; N*S must be >= experts per layer)")
    p.add_argument("--previous", metavar="PLAN.json", help="the previous plan (a --json output of this command)")
    p.add_argument("--min-balance", type=unit_fraction, default=DEFAULT_MIN_BALANCE, metavar="B",
                   help="with --previous: move the fewest replicas that bring every layer's balancedness to B, "
                   f"in (0, 1] (default: {DEFAULT_MIN_BALANCE})")
    p.add_argument("--zones", metavar="Z0,Z1,...", type=_zones,
                   help="each node's failure domain, one per node in order: replicas of an expert go to distinct "
                   "zones when the slots allow, and the plan says when losing a zone would leave experts unhosted")
    p.add_argument("--frontier", action="store_true",
                   help="with --previous: print replicas moved vs balancedness for a range of targets")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    add_cluster_args(p)
    return p


def _zones(text: str) -> list[str]:
    zones = [z.strip() for z in text.split(",")]
    if not all(zones):
        raise argparse.ArgumentTypeError(f"expected one zone name per node, comma-separated, got {text!r}")
    return zones


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise PlanError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{what} {path} is not valid JSON: {exc}") from None


def format_plan(plan: Plan) -> str:
    """A readable summary: per layer balancedness, replicas and moves, then node loads."""
    lines = [f"{plan.n_nodes} nodes x {plan.slots_per_node} slots"]
    for l, layer in enumerate(plan.layers):
        n_replicas = sum(len(r) for r in layer.replicas)
        replicated = sum(1 for r in layer.replicas if len(r) > 1)
        how = "kept previous placement" if layer.kept_previous else "new placement"
        lines.append(f"layer {l}: balancedness {layer.balancedness:.4f}, {n_replicas} replicas of "
                     f"{len(layer.replicas)} experts ({replicated} replicated), moved {layer.moved} ({how})")
        loads = " ".join(f"{v:g}" for v in layer.node_loads)
        lines.append(f"  node loads: {loads}")
    lines.append(f"moved: {plan.moved} replicas in total")
    lines.extend(f"warning: {w}" for w in plan.warnings)
    return "\n".join(lines)


def frontier(loads, n_nodes: int, slots_per_node: int, previous, targets, zones=None) -> dict:
    """Per target, the fewest replicas moved from ``previous`` reaching it (and the worst layer's balancedness);
    with the fresh plan (no previous: every replica loaded) for comparison."""
    rows = []
    for target in sorted(set(targets)):
        plan = plan_placement(loads, n_nodes, slots_per_node, previous, min_balance=target, zones=zones)
        rows.append({"min_balance": target, "moved": plan.moved, "balancedness": _worst(plan)})
    fresh = plan_placement(loads, n_nodes, slots_per_node, zones=zones)
    return {"frontier": rows, "fresh": {"moved": fresh.moved, "balancedness": _worst(fresh)}}


def _worst(plan: Plan) -> float:
    return min(layer.balancedness for layer in plan.layers)


def format_frontier(data: dict) -> str:
    lines = ["min balance  moved  balancedness (worst layer)"]
    for row in data["frontier"]:
        lines.append(f"{row['min_balance']:>11.3f}  {row['moved']:>5}  {row['balancedness']:.4f}")
    fresh = data["fresh"]
    lines.append(f"fresh plan   {fresh['moved']:>5}  {fresh['balancedness']:.4f}  (every replica loaded anew)")
    return "\n".join(lines)


def _run_cluster(args: argparse.Namespace) -> int:
    from moemesh.cli.plan_cluster import cluster, format_prediction
    from moemesh.cluster_model import ModelError
    from moemesh.model.config import ConfigError

    try:
        data = cluster(args)
    except (ModelError, ConfigError) as exc:
        print(f"moemesh plan: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(data) if args.json else format_prediction(data))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``moemesh plan`` from parsed flags (see :func:`add_parser`); returns the exit code."""
    if getattr(args, "cluster", False):
        return _run_cluster(args)
    try:
        for flag, value in (("--loads", args.loads), ("--nodes", args.nodes), ("--slots-per-node", args.slots_per_node)):
            if value is None:
                raise PlanError(f"{flag} is required (or --cluster for the cluster model)")
        loads = loads_from_json(_read_json(args.loads, "--loads"))
        previous = previous_from_json(_read_json(args.previous, "--previous")) if args.previous else None
        min_balance = getattr(args, "min_balance", DEFAULT_MIN_BALANCE)
        if getattr(args, "frontier", False):
            if previous is None:
                raise PlanError("--frontier needs --previous PLAN.json: it compares moves from that placement")
            data = frontier(loads, args.nodes, args.slots_per_node, previous, (*FRONTIER_TARGETS, min_balance),
                            getattr(args, "zones", None))
            print(json.dumps(data) if getattr(args, "json", False) else format_frontier(data))
            return 0
        zones = getattr(args, "zones", None)
        plan = plan_placement(loads, args.nodes, args.slots_per_node, previous, min_balance=min_balance, zones=zones)
    except PlanError as exc:
        print(f"moemesh plan: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if getattr(args, "json", False):
        print(json.dumps(plan.to_json()))
    else:
        print(format_plan(plan))
    return 0
