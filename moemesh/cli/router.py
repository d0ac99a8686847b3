"""``moemesh router``: the front door and control plane (its flags and server live in ``moemesh.router.main``)."""

from __future__ import annotations

import argparse

from moemesh.cli import flags


def add_parser(subparsers) -> argparse.ArgumentParser:
    from moemesh.router.main import add_router_parser

    p = add_router_parser(subparsers)
    flags.add_etcd_auth_args(p)
    flags.add_metrics_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    from moemesh.router.main import run_router

    args.etcd_credentials = flags.etcd_credentials(args)
    return run_router(args)
