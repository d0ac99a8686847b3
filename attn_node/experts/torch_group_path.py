"""TorchPair's path over a process group (gloo, NCCL: attn_node/experts/torch_link.py): packed frames, a reader
thread that waits for each reply in frame order and resolves its future. The ``tcp`` stream's path (the
request written at once, the reply read by its waiter) is TorchPair's own."""

from __future__ import annotations

import time
from concurrent.futures import Future

import torch

from moemesh.wire import p2p, p2p_groups

from .remote_backend import rows_with_work


class GroupPath:
    """A mixin of TorchPair (its fields: ``_pg``, ``_lock``, ``_pending``, ``_inflight``, ``_ids``, ``hops``...)."""

    def _send_group(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, version: int,
                    trim: bool) -> Future:
        fut: Future = Future()
        sent_at = time.monotonic()  # the hop is timed from here: packing is part of it
        args = (layer, x, idx, w, version, trim)
        if trim and self.backend in p2p.HOST_BACKENDS:
            # host tensors: trailing rows without work (the backend puts them last) need not cross. On NCCL
            # all T rows go (counting them would be a host read of device data); the expert skips the -1 ids.
            n = rows_with_work(idx.numpy())
            if n == 0:
                fut.set_result(torch.zeros((0, x.shape[1]), dtype=x.dtype, device=x.device))
                return fut
            x, idx, w = x[:n], idx[:n], w[:n]
        msg_id = next(self._ids)
        messages = p2p.pack_request(msg_id, layer, x, idx, w, version, self.device, self.inline_bytes)
        with self._lock:
            if self.failure is not None or self._closed:
                self._lost(fut, args, self.failure or "closed by the attention node")
                return fut
            try:
                works = [self._pg.send([m], p2p.EXPERT_RANK, p2p.TAG_REQUEST) for m in messages]
            except RuntimeError as exc:  # gloo refuses at once when the pair's connection is gone
                works, error = None, str(exc)
            else:
                self._pending[msg_id] = (fut, args)
                # the works (and the messages they send from) stay referenced until the reader has waited
                self._inflight.put((msg_id, x.shape[0], x.dtype, sent_at + self.timeout_s, works, messages, sent_at))
                self._last_send = time.monotonic()
        if works is None:
            self.fail(f"sending a dispatch frame: {error}")
            self._lost(fut, args, self.failure)
        return fut

    def _read_loop(self, req_pg, pg) -> None:
        """Replies in frame order. Holds both groups: they are destroyed when this returns, never under a wait."""
        src, backend = p2p.EXPERT_RANK, self.backend
        try:
            while (item := self._inflight.get()) is not None:
                msg_id, rows, dtype, deadline, works, _, sent_at = item
                if msg_id is None:  # a control frame (ping, bye): only its send to wait for
                    for work in works:
                        p2p_groups.wait(work, deadline - time.monotonic(), backend, "sending a control frame")
                    continue
                self._take_reply(pg, msg_id, rows, dtype, deadline, sent_at, works)
        except p2p.P2PError as exc:
            self.fail(str(exc))

    def _take_reply(self, pg, msg_id: int, rows: int, dtype: torch.dtype, deadline: float, sent_at: float,
                    works=()) -> None:
        """Receive the reply to ``msg_id`` (due next) and resolve its future; P2PError when the pair is done."""
        backend = self.backend
        buf = torch.empty(p2p.reply_bytes(rows, self.hidden_size, dtype), dtype=torch.uint8, device=self.device)
        reply = pg.recv([buf], p2p.EXPERT_RANK, p2p.TAG_REPLY)
        for work in works:
            p2p_groups.wait(work, deadline - time.monotonic(), backend, "sending a dispatch frame")
        p2p_groups.wait(reply, deadline - time.monotonic(), backend, "waiting for a reply")
        got = getattr(reply, "nbytes", None)  # the tcp backend says how long the message was
        if got is not None and got != buf.numel():
            raise p2p.P2PError(f"reply of {got} bytes where {buf.numel()} were due: frames out of step")
        self._resolve(p2p.unpack_reply(buf, rows, self.hidden_size, dtype), msg_id, sent_at)

    def _resolve(self, reply, msg_id: int, sent_at: float) -> None:
        """The reply due next, checked against ``msg_id``: its hop recorded, its future resolved."""
        if reply.msg_id != msg_id or reply.status != 0:
            raise p2p.P2PError(f"reply {reply.msg_id} (status {reply.status}) where {msg_id} was due: "
                               "frames out of step")
        with self._lock:
            entry = self._pending.pop(msg_id, None)
        self.messages += 1
        if entry is not None:
            self.hops.record(time.monotonic() - sent_at, reply.receive_ns, reply.compute_ns, reply.send_ns)
            entry[0].set_result(reply.rows)
