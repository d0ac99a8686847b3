"""``moemesh mesh``: list, add and remove the processes of a running ``moemesh up`` (its MeshControl service).

    moemesh mesh --control HOST:PORT list
    moemesh mesh --control HOST:PORT add-experts [--count N] [--wait]
    moemesh mesh --control HOST:PORT remove-expert NAME [--wait]

On a TLS mesh (``moemesh up --tls DIR``) add ``--tls-ca DIR/ca.pem --tls-cert DIR/operator.pem --tls-key
DIR/operator.key``: MeshControl takes only the operator's credential.

``--control`` is the ``"control"`` address in ``moemesh up``'s ready line. Prints one line per process
(or ``--json``); errors: exit 1 and one line naming the gRPC status.
"""

from __future__ import annotations

import argparse
import sys
import json

import grpc

from moemesh.argtypes import positive_float, positive_int
from moemesh.v1 import control_pb2, control_pb2_grpc


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "mesh", help="add or remove expert nodes of a running `moemesh up`",
        description="Talk to the MeshControl service of a running `moemesh up` (its ready line's \"control\" "
        "address). add-experts starts expert nodes that register in etcd and take load in the leader's next "
        "placement; remove-expert drains one (the leader plans it away, then it exits) while requests keep "
        "flowing.")
    p.add_argument("--control", required=True, metavar="HOST:PORT", help="the MeshControl address of `moemesh up`")
    p.add_argument("--timeout", type=positive_float, default=300.0, help="seconds to wait for an answer (default: 300)")
    p.add_argument("--tls-ca", metavar="F", help="the mesh CA (`moemesh up --tls DIR`: DIR/ca.pem); turns TLS on")
    p.add_argument("--tls-cert", metavar="F", help="the operator's certificate (DIR/operator.pem)")
    p.add_argument("--tls-key", metavar="F", help="the operator's private key (DIR/operator.key)")
    p.add_argument("--token-file", metavar="F", help="file holding the operator's bearer token")
    p.add_argument("--json", action="store_true", help="print the processes as one JSON object")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every process of the mesh and its state")
    add = actions.add_parser("add-experts", help="start more expert nodes")
    add.add_argument("--count", type=positive_int, default=1, help="how many (default: 1)")
    add.add_argument("--wait", action="store_true", help="return once they serve")
    remove = actions.add_parser("remove-expert", help="drain and stop one expert node")
    remove.add_argument("name", help="its name, e.g. expert-1 (see `list`)")
    remove.add_argument("--wait", action="store_true", help="return once it has exited")
    for action in (listing, add, remove):  # --json after the action too (SUPPRESS: not overriding one before it)
        action.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="print the processes as one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except grpc.RpcError as exc:
        print(f"moemesh mesh: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """TLS with the operator's certificate when given (a TLS mesh's MeshControl requires it), else plaintext."""
    from moemesh.wire.tls import SecurityConfigError, TLSFiles, read_file

    if args.tls_ca is None and args.tls_cert is None:
        return grpc.insecure_channel(args.control)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SecurityConfigError("--tls-cert and --tls-key go together: give both, or neither")
    if args.tls_cert is None:
        return grpc.secure_channel(args.control, grpc.ssl_channel_credentials(read_file(args.tls_ca, "CA (--tls-ca)")))
    return grpc.secure_channel(args.control, TLSFiles(args.tls_cert, args.tls_key, args.tls_ca).channel_credentials())


def _run(args: argparse.Namespace) -> int:
    from moemesh.wire.identity import read_token_file

    metadata = (("authorization", f"Bearer {read_token_file(args.token_file, 'token file (--token-file)')}"),) \
        if args.token_file else None
    with _channel(args) as channel:
        stub = control_pb2_grpc.MeshControlStub(channel)
        if args.action == "list":
            reply = stub.ListProcesses(control_pb2.ListProcessesRequest(), timeout=args.timeout, metadata=metadata)
        elif args.action == "add-experts":
            reply = stub.AddExpertNodes(control_pb2.AddExpertNodesRequest(count=args.count, wait_ready=args.wait),
                                        timeout=args.timeout, metadata=metadata)
        else:
            reply = stub.RemoveExpertNode(control_pb2.RemoveExpertNodeRequest(name=args.name, wait_exit=args.wait),
                                          timeout=args.timeout, metadata=metadata)
    rows = [{"name": p.name, "role": p.role, "pid": p.pid, "port": p.port, "state": p.state,
             **({"exit_code": p.exit_code} if p.state == "exited" else {})} for p in reply.processes]
    if args.json:
        print(json.dumps({"processes": rows}))
    else:
        for r in rows:
            code = f" (exit {r['exit_code']})" if "exit_code" in r else ""
            print(f"{r['name']:<12} {r['role']:<7} pid {r['pid']:<8} port {r['port']:<6} {r['state']}{code}")
    return 0
