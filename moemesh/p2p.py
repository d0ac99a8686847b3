"""The torch.distributed data plane (``--transport torch``): pair groups and the frames they carry.

Both roles use this module; neither imports the other. An attention node and one
expert node form a process group of their own (world size 2: attention node rank
0, expert node rank 1) per placement version, so a membership change or a dead
peer touches only that pair. The expert node hosts a ``TCPStore`` (its address is
in its etcd record and in the ``TorchTransport.Session`` answer); each group
rendezvouses under its own key prefix there. Groups are built directly
(``ProcessGroupGloo`` / ``ProcessGroupNCCL``), never through
``init_process_group``, so one process holds any number of them.

Frames are tensors sent with ``send``/``recv``; the gRPC codec is not involved.
Nothing is serialized: a frame is raw tensor memory, which is why both ends must
share byte order (little-endian everywhere we run, as for the codec)::

    request, attention -> expert (TAG_REQUEST)
      header  int64[8]  [kind, msg_id, layer, rows, k, version, dtype, hidden]
      body    uint8[]   topk_idx int32 [rows, k] | topk_weights float32 [rows, k] | hidden [rows, hidden]
                        (only for KIND_DISPATCH; PING and BYE are a header alone)
    reply, expert -> attention (TAG_REPLY)
      uint8[16 + rows * hidden * itemsize]   int64 msg_id, int64 status (0), then the partial rows
                                             in the request's dtype

Both sides know every size before they post a ``recv`` (the header carries the
body's, the request the reply's). Sends and receives between the pair are
matched in order; each side keeps one sending and one receiving thread per
peer, so order is the order of ``send`` calls.

Every wait has a timeout (:func:`wait`). A gloo wait that times out closes the
pair's connection, so a timeout is the end of a group, never a retry.

CUDA: with CUDA tensors the backend is NCCL (:func:`backend_for`), with two groups
per pair (one per direction: NCCL matches a pair's sends and receives in issue
order on one stream, so requests and replies must not share a communicator), and
waits poll ``is_completed`` up to the deadline, then abort the communicator.
This path is written but untested here: these machines have no GPU.
"""

from __future__ import annotations

import datetime
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moemesh.codec import dtype_from_proto, dtype_to_proto

if not dist.is_available():  # pragma: no cover - every torch wheel we install has it
    raise ImportError("the torch transport needs torch.distributed, which this torch build lacks")

KIND_DISPATCH, KIND_PING, KIND_BYE = 1, 2, 3
TAG_REQUEST, TAG_REPLY = 0, 1
HEADER_LEN = 8
REPLY_PREFIX = 16  # bytes: int64 msg_id, int64 status
ATTN_RANK, EXPERT_RANK = 0, 1
MAX_BODY_BYTES = 256 << 20  # as gRPC's message limit


class P2PError(RuntimeError):
    """A send, receive or rendezvous of a pair group failed or timed out; the group is unusable."""


@dataclass(frozen=True)
class Header:
    kind: int
    msg_id: int
    layer: int
    rows: int
    k: int
    version: int
    dtype: torch.dtype | None  # None for PING/BYE, or a code this side does not know
    hidden: int

    @property
    def body_bytes(self) -> int:
        return self.rows * self.k * 8 + self.rows * self.hidden * self.dtype.itemsize


def backend_for(device: torch.device | str) -> str:
    """NCCL between CUDA devices, gloo for CPU tensors."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


# ---- frames -----------------------------------------------------------------
def control_header(kind: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor([kind, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int64, device=device)


def pack_request(msg_id: int, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, version: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(header, body) for one dispatch message; the body is a copy (the caller may reuse x)."""
    rows, hidden = x.shape
    k = idx.shape[1]
    header = torch.tensor([KIND_DISPATCH, msg_id, layer, rows, k, version, dtype_to_proto(x.dtype), hidden],
                          dtype=torch.int64, device=device)
    meta = torch.cat([idx.to(device=device, dtype=torch.int32),
                      w.to(device=device, dtype=torch.float32).view(torch.int32)], dim=1)  # [rows, 2k]
    body = torch.cat([meta.reshape(-1).view(torch.uint8), x.to(device).contiguous().reshape(-1).view(torch.uint8)])
    return header, body


def unpack_header(header: torch.Tensor) -> Header:
    kind, msg_id, layer, rows, k, version, code, hidden = header.tolist()
    try:
        dtype = dtype_from_proto(code) if kind == KIND_DISPATCH else None
    except ValueError:
        dtype = None
    return Header(kind, msg_id, layer, rows, k, version, dtype, hidden)


def unpack_body(body: torch.Tensor, h: Header) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [rows, hidden], topk_idx int32 [rows, k], topk_weights float32 [rows, k]), views of ``body``."""
    split = h.rows * h.k * 8
    meta = body[:split].view(torch.int32).view(h.rows, 2 * h.k)
    x = body[split:].view(h.dtype).view(h.rows, h.hidden)
    return x, meta[:, : h.k].contiguous(), meta[:, h.k:].contiguous().view(torch.float32)


def reply_bytes(rows: int, hidden: int, dtype: torch.dtype) -> int:
    return REPLY_PREFIX + rows * hidden * dtype.itemsize


def pack_reply(msg_id: int, y: torch.Tensor, status: int = 0) -> torch.Tensor:
    head = torch.tensor([msg_id, status], dtype=torch.int64, device=y.device).view(torch.uint8)
    return torch.cat([head, y.contiguous().reshape(-1).view(torch.uint8)])


def unpack_reply(buf: torch.Tensor, rows: int, hidden: int, dtype: torch.dtype) -> tuple[int, int, torch.Tensor]:
    msg_id, status = buf[:REPLY_PREFIX].view(torch.int64).tolist()
    return msg_id, status, buf[REPLY_PREFIX:].view(dtype).view(rows, hidden)


# ---- groups -----------------------------------------------------------------
def host_store(port: int = 0, timeout_s: float = 30.0) -> dist.TCPStore:
    """The expert node's rendezvous store (a TCPStore server on ``port``; 0 picks one: ``.port``)."""
    return dist.TCPStore("0.0.0.0", port, None, True, datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def connect_store(address: str, timeout_s: float) -> dist.TCPStore:
    host, _, port = address.rpartition(":")
    return dist.TCPStore(host.strip("[]"), int(port), None, False, datetime.timedelta(seconds=timeout_s))


def local_host_toward(host: str) -> str:
    """This machine's address on the route to ``host`` (what a gloo device must bind so the peer reaches it)."""
    host = host.strip("[]")
    family, _, _, _, sockaddr = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)  # UDP: picks the route, sends nothing
        return s.getsockname()[0]


def new_pair_group(store, prefix: str, rank: int, backend: str, timeout_s: float, hostname: str,
                   device: torch.device | None = None) -> tuple:
    """(request group, reply group) of a world-size-2 group under ``prefix``; the same object twice for gloo.

    Blocks until the peer joins (at most ``timeout_s``)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=hostname)]
            opts._threads = 1  # collectives only; send/recv do not use these threads
            pg = dist.ProcessGroupGloo(dist.PrefixStore(f"{prefix}pg/", store), rank, 2, opts)
            return pg, pg
        if backend == "nccl":  # pragma: no cover - needs CUDA
            if not dist.is_nccl_available() or device is None or device.type != "cuda":
                raise P2PError("the nccl backend needs a CUDA build of torch and a CUDA device")
            torch.cuda.set_device(device)
            groups = []
            for direction in ("req", "rep"):
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = timeout
                groups.append(dist.ProcessGroupNCCL(dist.PrefixStore(f"{prefix}{direction}/", store), rank, 2, opts))
            return groups[0], groups[1]
        raise P2PError(f"unknown torch.distributed backend {backend!r} (gloo or nccl)")
    except P2PError:
        raise
    except Exception as exc:  # DistStoreError, gloo's RuntimeError: one type for callers
        raise P2PError(f"rendezvous under {prefix!r} failed: {exc}") from exc


def wait(work, timeout_s: float, backend: str = "gloo", what: str = "p2p operation") -> None:
    """Wait for one send/recv at most ``timeout_s``; P2PError (the group is then unusable) otherwise."""
    timeout_s = max(timeout_s, 0.001)
    try:
        if backend == "gloo":
            work.wait(datetime.timedelta(seconds=timeout_s))
            return
        deadline = time.monotonic() + timeout_s  # NCCL: wait() would only make the stream wait
        spins = 0
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:g}s")
            spins += 1
            time.sleep(0 if spins < 1000 else 50e-6)
        work.wait()  # raises the operation's own error, if it had one
    except Exception as exc:
        raise P2PError(f"{what}: {exc}") from exc
