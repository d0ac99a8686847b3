"""The torch.distributed data plane (``--transport torch``): pair groups and the frames they carry.

Both roles use this module; neither imports the other. An attention node and one
expert node form a process group of their own (world size 2: attention node rank
0, expert node rank 1) per placement version, so a membership change or a dead
peer touches only that pair. The expert node hosts a ``TCPStore`` (its address is
in its etcd record and in the ``TorchTransport.Session`` answer); each group
rendezvouses under its own key prefix there. Groups are built directly
(``ProcessGroupGloo`` / ``ProcessGroupNCCL``), never through
``init_process_group``, so one process holds any number of them.
The rendezvous and the waits are :mod:`moemesh.wire.p2p_groups`'s.
For host tensors the default backend is ``tcp`` (:mod:`moemesh.wire.p2p_socket`): the same frames
over one plain TCP stream with the process-group calls used here; gloo stays available to a peer
that asks for it.

Frames are tensors sent with ``send``/``recv``; the gRPC codec is not involved.
Nothing is serialized: a frame is raw tensor memory, which is why both ends must
share byte order (little-endian everywhere we run, as for the codec)::

    request, attention -> expert (TAG_REQUEST)
      frame   uint8[64 + inline_bytes]: the header int64[8]
              [kind, msg_id, layer, rows, k, version, dtype, hidden], then for KIND_INLINE the body
      body    uint8[]: topk_idx int32 [rows, k] | topk_weights float32 [rows, k] | hidden [rows, hidden]
              in the frame (KIND_INLINE) or as a second message of its own size (KIND_DISPATCH)
      PING and BYE are a header alone
    reply, expert -> attention (TAG_REPLY)
      uint8[40 + rows * hidden * itemsize]: int64 msg_id, int64 status (0), int64 receive_ns,
      compute_ns, send_ns (what the node spent, by its own clock: DispatchResponse's fields 30-32),
      then the partial rows in the request's dtype

On the ``tcp`` stream the host frames are not packed at all: :func:`request_parts` and
:func:`reply_parts` give a message as the buffers it is made of (the header's bytes, the ids and
weights, the caller's own rows) for one gathering send, and the receiver reads a message as views of
its bytes (:func:`host_meta`, :func:`host_rows`, :func:`host_reply`): the same bytes as the tensors
:func:`pack_request` and :func:`pack_reply` build for gloo and NCCL.

The expert node posts one receive of ``64 + inline_bytes`` for every frame; gloo
lets a shorter message land in it, so a decode-sized request is one message each
way, like a gRPC round trip. Larger bodies (and every body on NCCL, which needs
equal sizes on both ends: ``inline_bytes`` is 0 there) follow in a second message
whose size the header gave. Sends and receives between the pair are matched in
order: the attention node posts its sends under one lock, and the expert node
handles one frame at a time.

Every wait has a timeout (``p2p_groups.wait``). A gloo wait that times out closes the
pair's connection, so a timeout is the end of a group, never a retry.

CUDA: with CUDA tensors the backend is NCCL (:func:`backend_for`), with two groups
per pair (one per direction: NCCL matches a pair's sends and receives in issue
order on one stream, so requests and replies must not share a communicator), and
waits poll ``is_completed`` up to the deadline, then abort the communicator.
On NCCL every frame is a CUDA tensor and the rows (hidden states, ids, weights,
partial outputs) never visit host memory. Small host-built fields (a header, a
reply's prefix) go up through pinned memory without blocking (:func:`_upload`).
The host reads that remain are each needed, and each says why where it happens:
the expert node reads a header (it must learn the sizes of what follows) and the
ids and weights (validated before any math: a bad id on the GPU is a device-side
assert that ends the CUDA context); the attention node reads a reply's 40-byte
prefix (its message id, status and the node's timings) once the receive is complete.
This path is written but untested here: these machines have no GPU (and NCCL
refuses two ranks on one GPU).
"""

from __future__ import annotations

import struct
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from moemesh.wire.codec import dtype_from_proto, dtype_to_proto

if not dist.is_available():  # pragma: no cover - every torch wheel we install has it
    raise ImportError("the torch transport needs torch.distributed, which this torch build lacks")

KIND_DISPATCH, KIND_PING, KIND_BYE, KIND_INLINE = 1, 2, 3, 4
TAG_REQUEST, TAG_REPLY = 0, 1
HEADER_LEN = 8
HEADER_BYTES = HEADER_LEN * 8
REPLY_PREFIX = 40  # bytes: int64 msg_id, status, receive_ns, compute_ns, send_ns
ATTN_RANK, EXPERT_RANK = 0, 1
INLINE_BYTES = 1 << 20  # gloo: bodies up to 1 MiB ride in the header's frame (a [64, 4096] fp32 decode batch)
MAX_BODY_BYTES = 256 << 20  # as gRPC's message limit


_HEADER = struct.Struct("<8q")  # the header's int64[8], read and written without a tensor or an array
_PREFIX = struct.Struct("<5q")  # a reply's prefix
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}  # hidden dtypes numpy has


class P2PError(RuntimeError):
    """A send, receive or rendezvous of a pair group failed or timed out; the group is unusable."""


class Header(NamedTuple):  # a tuple: built per message, at a third of a frozen dataclass's cost
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


HOST_BACKENDS = ("tcp", "gloo")  # frames in host memory: the one TCP stream (p2p_socket.py), or gloo's


def backend_for(device: torch.device | str) -> str:
    """NCCL between CUDA devices; for CPU tensors the plain TCP stream (p2p_socket.py: gloo's thread hand-offs
    cost more than the bytes), gloo when a session asks for it."""
    return "nccl" if torch.device(device).type == "cuda" else "tcp"


# ---- frames -----------------------------------------------------------------
# On CPU, frames are built and read through numpy views of one buffer: a decode-sized message is
# tens of bytes of metadata, and a numpy view costs ~1 us where a torch op costs ~10.
def _upload(values: list[int], device: torch.device | str) -> torch.Tensor:
    """int64 values as uint8 bytes on ``device``; on a CUDA device without blocking the host.

    A pageable host-to-device copy waits for the stream (a sync); from pinned memory with ``non_blocking`` it does
    not, and torch's pinned-memory cache keeps the source until the copy has run."""
    host = torch.tensor(values, dtype=torch.int64)
    device = torch.device(device)
    if device.type == "cpu":
        return host.view(torch.uint8)
    return host.pin_memory().to(device=device, non_blocking=True).view(torch.uint8)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a (small) device frame field; on the CPU the tensor itself. Callers say why they need it."""
    return t if t.device.type == "cpu" else t.cpu()


def control_frame(kind: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return _upload([kind, 0, 0, 0, 0, 0, 0, 0], device)


def pack_request(msg_id: int, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, version: int,
                 device: torch.device | str = "cpu", inline_bytes: int = 0) -> list[torch.Tensor]:
    """The messages of one dispatch request, in send order: [frame] or [frame, body]. Copies (x may be reused)."""
    rows, hidden = x.shape
    k = idx.shape[1]
    split = rows * k * 8
    body_bytes = split + x.numel() * x.dtype.itemsize
    kind = KIND_INLINE if body_bytes <= inline_bytes else KIND_DISPATCH
    head = [kind, msg_id, layer, rows, k, version, dtype_to_proto(x.dtype), hidden]
    if torch.device(device).type != "cpu":
        # device to device: rows, ids and weights are packed on the device (x, idx, w are there already);
        # only the header's eight host ints go up, through pinned memory (no sync)
        header = _upload(head, device)
        ids = idx.to(device=device, dtype=torch.int32).reshape(-1).view(torch.uint8)
        weights = w.to(device=device, dtype=torch.float32).reshape(-1).view(torch.uint8)
        rows_bytes = x.to(device=device).reshape(-1).view(torch.uint8)  # reshape copies only a strided x
        body = torch.cat([ids, weights, rows_bytes])
        return [torch.cat([header, body])] if kind == KIND_INLINE else [header, body]
    buf = torch.empty(HEADER_BYTES + body_bytes, dtype=torch.uint8)
    raw = buf.numpy()
    _HEADER.pack_into(raw, 0, *head)
    meta = raw[HEADER_BYTES:HEADER_BYTES + split]
    meta[: split // 2].view(np.int32)[:] = idx.cpu().numpy().reshape(-1)
    meta[split // 2:].view(np.float32)[:] = w.detach().cpu().float().numpy().reshape(-1)
    buf[HEADER_BYTES + split:].view(x.dtype).view(rows, hidden).copy_(x)
    return [buf] if kind == KIND_INLINE else [buf[:HEADER_BYTES], buf[HEADER_BYTES:]]


def _host_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous host tensor's memory as a numpy array (no copy; bf16 has no numpy dtype, int16 has its size)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return (t.detach() if t.requires_grad else t).numpy()


def dtype_code(dtype: torch.dtype) -> int:
    """A hidden dtype's code in the header (the codec's)."""
    return dtype_to_proto(dtype)


def request_head(msg_id: int, layer: int, x: torch.Tensor, k: int, version: int, inline_bytes: int) -> tuple:
    """The header's 8 ints of a request of rows ``x`` (kind first: inline when the body fits ``inline_bytes``)."""
    rows, hidden = x.shape
    body_bytes = rows * k * 8 + rows * hidden * x.element_size()
    kind = KIND_INLINE if body_bytes <= inline_bytes else KIND_DISPATCH
    return kind, msg_id, layer, rows, k, version, dtype_to_proto(x.dtype), hidden


def request_parts(msg_id: int, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, version: int,
                  inline_bytes: int) -> list[list]:
    """The messages of one dispatch request from host tensors, each as the buffers it is made of, in order: the
    same bytes as :func:`pack_request`'s, for a gathering send (p2p_socket's ``send_parts``) that copies nothing
    but the ids and weights it converts (to int32 and float32, [rows, k] each). ``x`` must be contiguous."""
    return request_parts_from(request_head(msg_id, layer, x, idx.shape[1], version, inline_bytes), idx, w, x)


def request_parts_from(head: tuple, idx: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> list[list]:
    """:func:`request_parts` for a header already made (:func:`request_head`)."""
    ids = np.ascontiguousarray(_host_bytes(idx), dtype=np.int32)  # no copy when it is so already
    weights = np.ascontiguousarray(_host_bytes(w.detach().float()), dtype=np.float32)  # bf16 bits are no values
    head_bytes = _HEADER.pack(*head)
    if head[0] == KIND_INLINE:
        return [[head_bytes, ids, weights, _host_bytes(x)]]
    return [[head_bytes], [ids, weights, _host_bytes(x)]]


def unpack_header(frame: torch.Tensor | np.ndarray) -> Header:
    """``frame``: the frame tensor, or (host frames) its numpy view, made once per buffer: ~1 us where torch
    slicing costs several."""
    if isinstance(frame, np.ndarray):
        head = frame
    else:  # host read (a sync on a device): the receiver must learn the frame's kind and sizes to post what follows
        head = _to_host(frame.narrow(0, 0, HEADER_BYTES)).numpy()
    kind, msg_id, layer, rows, k, version, code, hidden = _HEADER.unpack_from(head)
    try:
        dtype = dtype_from_proto(code) if kind in (KIND_DISPATCH, KIND_INLINE) else None
    except ValueError:
        dtype = None
    return Header(kind, msg_id, layer, rows, k, version, dtype, hidden)


def body_tensors(body: torch.Tensor, h: Header) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [rows, hidden], topk_idx int32 [rows, k], topk_weights float32 [rows, k]) on ``body``'s device:
    hidden is a view, ids and weights are small contiguous copies (on NCCL the shard computes from these; nothing
    goes through the host)."""
    half = h.rows * h.k * 4
    ids = body.narrow(0, 0, half).view(torch.int32).view(h.rows, h.k)
    weights = body.narrow(0, half, half).view(torch.float32).view(h.rows, h.k)
    x = body.narrow(0, 2 * half, h.body_bytes - 2 * half).view(h.dtype).view(h.rows, h.hidden)
    return x, ids, weights


def unpack_body(body: torch.Tensor, h: Header) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(hidden [rows, hidden] on the body's device, topk_idx int32 and topk_weights float32 [rows, k] in numpy).

    hidden is a view of ``body``; the numpy arrays are host copies, for checks (and the shard, on the CPU)."""
    split = h.rows * h.k * 8
    # host read (a sync on a device): ids and weights are validated before any math, because an id out of range
    # on a GPU is a device-side assert that ends the CUDA context; it is T*K*8 bytes, not the rows
    meta = _to_host(body.narrow(0, 0, split)).numpy()
    x = body.narrow(0, split, h.body_bytes - split).view(h.dtype).view(h.rows, h.hidden)
    return (x, meta[: split // 2].view(np.int32).reshape(h.rows, h.k),
            meta[split // 2:].view(np.float32).reshape(h.rows, h.k))


def host_meta(body: np.ndarray, h: Header) -> tuple[np.ndarray, np.ndarray]:
    """A host body's (topk_idx int32 [rows, k], topk_weights float32 [rows, k]) as numpy views of its bytes."""
    half = h.rows * h.k * 4
    return body[:half].view(np.int32).reshape(h.rows, h.k), body[half:2 * half].view(np.float32).reshape(h.rows, h.k)


def host_rows(body: np.ndarray, h: Header) -> torch.Tensor:
    """A host body's hidden rows [rows, hidden] as a tensor over its bytes (no copy)."""
    return torch.from_numpy(body[h.rows * h.k * 8:h.body_bytes]).view(h.dtype).view(h.rows, h.hidden)


def host_body(body: np.ndarray, h: Header) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """A host body (numpy uint8 view) as (hidden [rows, hidden], topk_idx int32, topk_weights float32 tensors,
    and the same ids and weights in numpy, for the checks): all five are views of the body's own bytes (numpy
    slicing and ``from_numpy``: no copy, and no torch op but the views)."""
    half = h.rows * h.k * 4
    ids = body[:half].view(np.int32).reshape(h.rows, h.k)
    weights = body[half:2 * half].view(np.float32).reshape(h.rows, h.k)
    x = torch.from_numpy(body[2 * half:h.body_bytes]).view(h.dtype).view(h.rows, h.hidden)
    return x, torch.from_numpy(ids), torch.from_numpy(weights), ids, weights


def reply_bytes(rows: int, hidden: int, dtype: torch.dtype) -> int:
    return REPLY_PREFIX + rows * hidden * dtype.itemsize


def pack_reply(msg_id: int, y: torch.Tensor, status: int = 0, receive_ns: int = 0, compute_ns: int = 0,
               started_ns: int | None = None) -> torch.Tensor:
    """The reply frame; ``started_ns`` (monotonic_ns when the node began the reply): send_ns is from then to the
    rows packed (written after them, so the prefix's own write is all it leaves out)."""
    rows, hidden = y.shape
    buf = torch.empty(reply_bytes(rows, hidden, y.dtype), dtype=torch.uint8, device=y.device)
    buf.narrow(0, REPLY_PREFIX, buf.numel() - REPLY_PREFIX).view(y.dtype).view(rows, hidden).copy_(y)
    send_ns = 0 if started_ns is None else time.monotonic_ns() - started_ns
    prefix = [msg_id, status, receive_ns, compute_ns, send_ns]
    if y.device.type == "cpu":
        _PREFIX.pack_into(buf.numpy(), 0, *prefix)
    else:
        buf.narrow(0, 0, REPLY_PREFIX).copy_(_upload(prefix, y.device))  # device to device, no sync
    return buf


def reply_parts(msg_id: int, y: torch.Tensor | np.ndarray, status: int = 0, receive_ns: int = 0, compute_ns: int = 0,
                send_ns: int = 0) -> list:
    """A host reply as the buffers of one gathering send (the same bytes as :func:`pack_reply`'s): the prefix,
    then ``y``'s own memory (a contiguous host tensor, or its bytes in numpy), not copied."""
    return [_PREFIX.pack(msg_id, status, receive_ns, compute_ns, send_ns), y if isinstance(y, np.ndarray)
            else _host_bytes(y)]


class Reply(NamedTuple):
    msg_id: int
    status: int
    receive_ns: int
    compute_ns: int
    send_ns: int
    rows: torch.Tensor  # [rows, hidden]: a view of the frame, on its device


def unpack_reply(buf: torch.Tensor, rows: int, hidden: int, dtype: torch.dtype) -> Reply:
    # host read of 40 bytes (on a device, after the receive completed): frames must be checked in step before
    # their rows are handed on; the rows themselves stay where they are
    prefix = buf.numpy() if buf.device.type == "cpu" else _to_host(buf.narrow(0, 0, REPLY_PREFIX)).numpy()
    y = buf[REPLY_PREFIX:].view(dtype).view(rows, hidden)
    return Reply(*_PREFIX.unpack_from(prefix), y)


def reply_prefix(msg: np.ndarray) -> tuple[int, int, int, int, int]:
    """A received host reply's (msg_id, status, receive_ns, compute_ns, send_ns)."""
    return _PREFIX.unpack_from(msg)


def host_reply_rows(msg: np.ndarray, rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """A received host reply's rows [rows, hidden] (``msg``: a uint8 view that the next receive overwrites),
    copied out once into a tensor of their own: what the caller keeps."""
    body = msg[REPLY_PREFIX:].copy()
    np_dtype = _NUMPY_DTYPES.get(dtype)
    if np_dtype is not None:  # shaped in numpy: a torch view costs more than the copy
        return torch.from_numpy(body.view(np_dtype).reshape(rows, hidden))
    return torch.from_numpy(body).view(dtype).view(rows, hidden)


def host_reply(msg: np.ndarray, rows: int, hidden: int, dtype: torch.dtype) -> Reply:
    """A received host reply, its rows copied out (:func:`host_reply_rows`)."""
    return Reply(*reply_prefix(msg), host_reply_rows(msg, rows, hidden, dtype))
