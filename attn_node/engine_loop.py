"""EngineLoop: the engine on its own thread, fed by a bounded inbox, reporting tokens by callback.

The engine is synchronous and not thread-safe; the gRPC service is asyncio. This
object is the only thing that touches the engine after start: requests and
aborts arrive through a thread-safe inbox (bounded: a full inbox is
RESOURCE_EXHAUSTED, never unbounded memory), and each request's events are
handed to the callback it came with, on the engine thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from moemesh import metrics
from moemesh.errors import MoemeshError, ResourceExhaustedError
from moemesh.logs import get_logger
from moemesh.sampling import SamplingParams

from .engine import Engine, TokenEvent

log = get_logger("moemesh.attn_node.loop")

EventCallback = Callable[[TokenEvent], None]


@dataclass
class _Submit:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_event: EventCallback
    resumed: int = 0  # prompt ids an earlier node sampled (see Engine.add_request)


class EngineLoop:
    def __init__(self, engine: Engine, max_pending: int = 256):
        self.engine = engine
        self.max_pending = max_pending
        self._inbox: deque = deque()
        self._callbacks: dict[str, EventCallback] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> "EngineLoop":
        self.publish_metrics()
        self._thread.start()
        return self

    def publish_metrics(self) -> None:
        """Point the process's engine gauges at this loop (one attention node per process: the last one wins)."""
        blocks = self.engine.blocks
        metrics.QUEUE_DEPTH.labels("attn").set_function(lambda: len(self._inbox) + self.num_waiting())
        metrics.RUNNING.labels("attn").set_function(self.num_running)
        metrics.CACHE_USAGE.labels("attn").set_function(lambda: 1.0 - blocks.num_free / blocks.num_blocks)
        micro = self.engine.micro
        metrics.MICRO_BATCHES.labels("attn").set_function(lambda: micro.current)
        metrics.PREFIX_CACHE.source = lambda: blocks.snapshot(max_hashes=0)

    # ---- called from any thread ------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, on_event: EventCallback,
               resumed: int = 0) -> None:
        """Check the prompt now (raises InvalidRequestError), queue for the engine thread."""
        self.engine.validate(prompt_ids, params)
        with self._cv:
            if self._stopping:
                raise ResourceExhaustedError("this attention node is shutting down: retry on another")
            if len(self._inbox) + self.num_waiting() >= self.max_pending:
                raise ResourceExhaustedError(
                    f"{self.max_pending} requests are already waiting on this attention node: retry later")
            self._inbox.append(_Submit(request_id, prompt_ids, params, on_event, resumed))
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._inbox.append(("abort", request_id))
            self._cv.notify()

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout_s)

    # ---- the engine thread -------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self.engine.has_unfinished() and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self.engine.has_unfinished() and not self._inbox:
                    return
                items = list(self._inbox)
                self._inbox.clear()
            for item in items:
                self._take(item)
            if self.engine.has_unfinished():
                self._step()

    def _take(self, item) -> None:
        if isinstance(item, tuple):  # abort
            if self._callbacks.pop(item[1], None) is not None:
                self.engine.abort(item[1])
            return
        try:
            self.engine.add_request(item.prompt_ids, item.params, item.request_id, item.resumed)
        except Exception as exc:  # validated at submit; a duplicate id or a race lands here
            error = exc if isinstance(exc, MoemeshError) else MoemeshError(f"internal error: {exc}")
            item.on_event(TokenEvent(item.request_id, None, True, "error", error))
            return
        self._callbacks[item.request_id] = item.on_event

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as exc:  # never let one bad step kill the loop: fail what was running
            log.exception("engine_step_failed")
            error = MoemeshError(f"internal error: {exc}")  # INTERNAL: a bug, not the request's fault
            events = [TokenEvent(rid, None, True, "error", error) for rid in list(self._callbacks)]
            for rid in list(self._callbacks):
                self.engine.abort(rid)
        for ev in events:
            cb = self._callbacks.get(ev.request_id)
            if ev.finished:
                self._callbacks.pop(ev.request_id, None)
            if cb is not None:
                cb(ev)
