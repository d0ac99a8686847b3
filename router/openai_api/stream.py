"""One generation for an HTTP request: the router's request path in its own task, and client disconnects.

:class:`GenerationStream` runs :meth:`~router.generation.GenerationPath.generate` in one task (its
log context and cleanup stay in one task whichever of the door's tasks reads it) and hands the
responses over a small queue, so a slow reader slows the node's stream rather than piling it up.
:meth:`GenerationStream.close` cancels that task: the path cancels the attention node's stream, and
the node frees the request's cache. :func:`until_disconnect` runs a non-streaming request while
watching for the client's ``http.disconnect`` (as vLLM's ``with_cancellation``); a streaming response
(sse-starlette) cancels its generator on disconnect, whose ``finally`` closes the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

from starlette.requests import Request

from moemesh.v1 import inference_pb2

from ..admission import Caller
from . import shapes
from ..generation import CallHooks, GenerationPath, GenerationRecord

_END = object()
QUEUE_RESPONSES = 16


class ClientGone(Exception):
    """The HTTP client closed its connection before the answer was ready."""


class GenerationStream:
    """The responses of one generation, read with :meth:`next` / ``async for``; :meth:`close` stops it."""

    def __init__(self, path: GenerationPath, request: inference_pb2.GenerateRequest, caller: Caller):
        self.node: str | None = None  # the attention node serving it, once known
        self.record: GenerationRecord | None = None  # how it was served, once finished
        self._queue: asyncio.Queue = asyncio.Queue(QUEUE_RESPONSES)
        self._closed = False
        hooks = CallHooks(cancelled=lambda: self._closed, first_node=self._first_node, finished=self._finished)
        self._task = asyncio.get_running_loop().create_task(self._pump(path.generate(request, caller, hooks)),
                                                            name=f"http-generate-{request.request_id}")

    async def _first_node(self, node_id: str) -> None:
        self.node = node_id

    def _finished(self, record: GenerationRecord) -> None:
        self.record = record

    async def _pump(self, responses: AsyncIterator) -> None:
        try:
            async for response in responses:
                await self._queue.put(response)
            await self._queue.put(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the reader raises it
            await self._queue.put(exc)
        finally:
            await responses.aclose()

    async def next(self) -> inference_pb2.GenerateResponse | None:
        """The next response; None at the end; raises the path's error."""
        item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def __aiter__(self):
        return self

    async def __anext__(self) -> inference_pb2.GenerateResponse:
        item = await self.next()
        if item is None:
            raise StopAsyncIteration
        return item

    async def collect(self) -> shapes.Collected:
        """Every response to the end, gathered for a whole (non-streamed) answer."""
        collected = shapes.Collected()
        async for response in self:
            collected.add(response)
        return collected

    async def close(self) -> None:
        """Stop the generation (no-op once it ended) and wait for its cleanup."""
        self._closed = True
        if not self._task.done():
            self._task.cancel()
        try:
            await asyncio.shield(self._task)
        except BaseException:
            pass


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable):
    """``await work``, unless the client disconnects first: then ``work`` is cancelled and ClientGone raised."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        listener.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:
        pass
    raise ClientGone()
