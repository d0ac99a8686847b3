"""CPU per dispatch hop on both sides of the torch (tcp) transport, against a raw TCP echo of the same bytes.

    .venv/bin/python scripts/hop_cpu.py MODEL [ROUNDS] [HOPS]      (batch 1 and 32; defaults 3 rounds x 1000)

One expert node process (experts 0-31, ``--transport torch``) and one echo process (plain Python,
``recv_into`` a buffer made once, as ``moemesh bench --mesh``'s). Hop and echo alternate round by round, so
both see the same load; each round prints the median wall time and the CPU per round trip of each side: this
thread's ``time.thread_time`` for the attention side and the echo client, the peer process's
``/proc/PID/task/*/schedstat`` for the node and the echo server. CPU per hop moves much less with the
machine's load than wall time does; compare figures from one run only. With the C receive's spin
(``MOEMESH_P2P_SPIN_US``, p2p_socket.py) the CPU of a side includes its spin while it waits for the other.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from moemesh.attn_node.experts.torch_link import TorchLink
from moemesh.cli.bench_mesh import ECHO_SERVER
from moemesh.launch.procs import spawn_expert_nodes


def process_cpu_s(pid: int) -> float:
    """CPU seconds of every thread of ``pid`` so far (schedstat: nanoseconds, unlike stat's 10 ms ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:  # a thread that ended meanwhile
            pass
    return total * 1e-9


def spin_summary(link) -> str:
    """How the attention side's receive spins went so far (p2p_native.c spin_recv): caught/missed/preempted."""
    stats = link.pair._stream.spin_stats() if link.pair._stream is not None else {}
    if not stats or not stats["max_ns"]:
        return "off"
    return f"{stats['caught']}/{stats['missed']}/{stats['preempted']} caught/missed/preempted"


def hop_round(link, layer: int, rows: int, hidden: int, k: int, n: int) -> tuple[float, float]:
    """(median wall us, this thread's CPU us per hop) of n hops with no expert work."""
    x, idx, w = torch.randn(rows, hidden), torch.full((rows, k), -1, dtype=torch.int64), torch.full((rows, k), 1 / k)
    for _ in range(20):
        link.send(layer, x, idx, w, 0).result(timeout=30)
    times, cpu = [], time.thread_time()
    for _ in range(n):
        start = time.perf_counter()
        link.send(layer, x, idx, w, 0).result(timeout=30)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6, (time.thread_time() - cpu) / n * 1e6


def echo_round(sock: socket.socket, nbytes: int, n: int) -> tuple[float, float]:
    payload, buf, times, cpu = b"x" * nbytes, bytearray(1 << 20), [], time.thread_time()
    for _ in range(n):
        start = time.perf_counter()
        sock.sendall(payload)
        got = 0
        while got < nbytes:
            got += sock.recv_into(buf)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6, (time.thread_time() - cpu) / n * 1e6


def main() -> None:
    model = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    hidden, k, layer = cfg["hidden_size"], cfg["num_experts_per_tok"], cfg.get("first_k_dense_replace", 0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as logs:
        (node,) = spawn_expert_nodes(model, ["0-31"], log_dir=logs, extra_args=["--transport", "torch"])
        echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
        try:
            sock = socket.create_connection(("127.0.0.1", int(echo.stdout.readline())))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = TorchLink(node.address, hidden_size=hidden)
            if not link.wait_ready(60):
                raise SystemExit(f"the torch pair did not come up: {link.pair.failure}")
            for rows in (1, 32):
                nbytes = 64 + rows * k * 8 + rows * hidden * 4  # the request frame's bytes
                for r in range(rounds):
                    before = process_cpu_s(node.proc.pid)
                    hop, attn = hop_round(link, layer, rows, hidden, k, n)
                    node_us = (process_cpu_s(node.proc.pid) - before) / (n + 20) * 1e6
                    before = process_cpu_s(echo.pid)
                    wall, client = echo_round(sock, nbytes, n)
                    server = (process_cpu_s(echo.pid) - before) / n * 1e6
                    print(f"batch {rows} round {r}: hop {hop:5.0f} us (CPU attention {attn:4.0f}, node {node_us:4.0f})"
                          f" | echo {wall:5.0f} us (CPU client {client:4.0f}, server {server:4.0f}) | {hop / wall:.2f}x"
                          f" | attention spins {spin_summary(link)}", flush=True)
            link.close()
        finally:
            echo.kill()
            node.stop()


if __name__ == "__main__":
    main()
