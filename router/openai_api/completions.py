"""POST /v1/completions: a prompt (text or token ids) completed, whole or streamed as server-sent events."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from moemesh.v1 import inference_pb2

from . import shapes
from ..admission import Caller
from .door import Door, request_id
from .protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo
from .sampling import completion_request
from .sse import DONE, sse_events
from .stream import GenerationStream, until_disconnect


def routes(door: Door) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request, caller: Caller = Depends(door.caller)):
        model, _ = await door.model(body.model)
        rid = request_id(request)
        generate = completion_request(body, rid)
        k = body.logprobs
        stream = GenerationStream(door.path, generate, caller)
        try:
            if body.stream:
                first = await until_disconnect(request, stream.next())  # errors before the first token: HTTP status
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return EventSourceResponse(sse_events(stream, first, _chunks(stream, first, f"cmpl-{rid}", model, k,
                                                                            include_usage)), sep="\n")
            collected = await until_disconnect(request, stream.collect())
        except BaseException:
            await stream.close()
            raise
        return _response(collected, f"cmpl-{rid}", model, k)

    return api


def _response(collected: shapes.Collected, cid: str, model: str, k: int | None) -> CompletionResponse:
    last = collected.last
    logprobs = None if k is None else shapes.completion_logprobs(collected.logprobs, k)
    return CompletionResponse(id=cid, model=model, usage=shapes.usage(last), choices=[CompletionChoice(
        text=collected.joined, logprobs=logprobs, finish_reason=shapes.finish_reason(last))])


def chunk_json(cid: str, created: int, model: str, response: inference_pb2.GenerateResponse, k: int | None,
               offset: int) -> tuple[str, int]:
    """One stream chunk for ``response`` and the text offset after it."""
    logprobs = None if k is None else shapes.completion_logprobs(response.logprobs, k, offset)
    choice = CompletionChoice(text=response.text, logprobs=logprobs, finish_reason=shapes.finish_reason(response))
    chunk = CompletionResponse(id=cid, created=created, model=model, choices=[choice])
    after = offset if logprobs is None or not logprobs.tokens else shapes.next_offset(logprobs)
    return chunk.model_dump_json(exclude={"usage"}), after


async def _chunks(stream: GenerationStream, first, cid: str, model: str, k: int | None, include_usage: bool):
    created = CompletionResponse(id=cid, model=model, choices=[]).created
    offset, response, last = 0, first, first
    while response is not None:
        if response.text or response.finish_reason or response.logprobs:
            data, offset = chunk_json(cid, created, model, response, k, offset)
            yield data
        last, response = response, await stream.next()
    if include_usage and last is not None:  # OpenAI's final chunk: usage, no choices
        usage: UsageInfo = shapes.usage(last)
        yield json.dumps({"id": cid, "object": "text_completion", "created": created, "model": model,
                          "choices": [], "usage": usage.model_dump()})
    yield DONE
