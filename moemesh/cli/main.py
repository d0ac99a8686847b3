"""The ``moemesh`` command line: one entry point, a subcommand per job, one module per subcommand.

Each module in :data:`COMMANDS` has ``add_parser(subparsers)`` and ``run(args) -> exit code``; its heavy
imports (torch, the roles) happen inside ``run``, so ``moemesh --help`` stays quick.

Every failure a user can cause (a missing model directory, a config that is not DeepSeek, an
out-of-range argument) ends with one line on stderr saying what to fix and a non-zero exit, never a
traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from moemesh.cli import (attn_node, bench, certs, expert_node, generate, mesh, plan, profile, query, router,
                         status, tiny, up)
from moemesh.cli.flags import EXIT_USAGE, Parser
from moemesh.errors import MoemeshError
from moemesh.model.config import ConfigError

# In the order `moemesh --help` lists them.
COMMANDS = {
    "tiny-checkpoint": tiny,
    "generate": generate,
    "expert-node": expert_node,
    "attn-node": attn_node,
    "router": router,
    "plan": plan,
    "up": up,
    "certs": certs,
    "mesh": mesh,
    "query": query,
    "status": status,
    "bench": bench,
    "profile": profile,
}


def build_parser() -> Parser:
    parser = Parser(
        prog="moemesh",
        description="Serve DeepSeek-V2/V3 mixture-of-experts models with attention/expert disaggregation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from moemesh import logs
    from moemesh.launch.parent_watch import exit_with_parent

    exit_with_parent()  # a role started by `moemesh up`: end with it
    logs.configure(getattr(args, "log_level", "warning"))  # JSON lines on stderr: stdout stays the command's output
    try:
        if getattr(args, "metrics_port", None) is not None:
            from moemesh.metrics import serve_metrics

            serve_metrics(args.metrics_port, args.host)  # the node's --host: no wider than its service
        return COMMANDS[args.command].run(args)
    except (ConfigError, MoemeshError, ValueError, OSError) as exc:
        print(f"moemesh {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
