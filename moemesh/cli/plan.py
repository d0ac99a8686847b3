"""``moemesh plan``: plan an expert placement from per-layer expert loads (see ``moemesh.router.planner``).

The CLI adds the subcommand with :func:`add_parser` and runs it with :func:`run`::

    moemesh plan --loads LOADS.json --nodes N --slots-per-node S [--previous PLAN.json] [--min-gain G] [--json]

LOADS.json is ``{"loads": [[load of expert e in layer l, ...] for each layer]}``. ``--json`` prints the plan
(``Plan.to_json``): ``"layers"``, each with ``"replicas"`` ``{"<expert id>": [{"node": i, "share": f}, ...]}``,
``"balancedness"``, ``"node_loads"``, ``"moved"`` (replicas placed on a node that did not hold them in
``--previous``; every replica without ``--previous``) and ``"kept_previous"``; top-level ``"moved"`` is the total.
That output is a valid ``--previous`` of the next call. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from moemesh.router.planner import (DEFAULT_MIN_GAIN, Plan, PlanError, loads_from_json, plan_placement,
                                    previous_from_json)

EXIT_BAD_INPUT = 2


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``plan`` to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "plan", help="plan expert replicas and shares on expert nodes from per-expert loads",
        description="Place every (layer, expert) on N expert nodes of S slots each: hot experts are replicated "
        "into spare slots and each replica's share of the expert's tokens is chosen so the most loaded node is "
        "as close to the mean as possible. With --previous, the previous placement is kept (only shares change) "
        "unless a fresh plan's balancedness (mean / max node load) is more than --min-gain higher. "
        "Deterministic; reads files only, prints the plan.")
    p.add_argument("--loads", required=True, metavar="LOADS.json",
                   help='{"loads": [[load of expert e in layer l, ...] for each layer]}')
    p.add_argument("--nodes", required=True, type=int, metavar="N", help="expert nodes (>= 1)")
    p.add_argument("--slots-per-node", required=True, type=int, metavar="S",
                   help="experts a node can hold per MoE layer (>= 1; N*S must be >= experts per layer)")
    p.add_argument("--previous", metavar="PLAN.json", help="the previous plan (a --json output of this command)")
    p.add_argument("--min-gain", type=float, default=DEFAULT_MIN_GAIN, metavar="G",
                   help="balancedness gain that justifies moving replicas away from --previous "
                   f"(default: {DEFAULT_MIN_GAIN})")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return p


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
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``moemesh plan`` from parsed flags (see :func:`add_parser`); returns the exit code."""
    try:
        loads = loads_from_json(_read_json(args.loads, "--loads"))
        previous = previous_from_json(_read_json(args.previous, "--previous")) if args.previous else None
        plan = plan_placement(loads, args.nodes, args.slots_per_node, previous,
                              min_gain=getattr(args, "min_gain", DEFAULT_MIN_GAIN))
    except PlanError as exc:
        print(f"moemesh plan: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if getattr(args, "json", False):
        print(json.dumps(plan.to_json()))
    else:
        print(format_plan(plan))
    return 0
