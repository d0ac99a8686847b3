"""POST /v1/chat/completions: messages rendered with the model's chat template, answered whole or streamed.

The rendered conversation goes to the mesh as text with ``add_special_tokens=false`` (the template wrote
the BOS), exactly as transformers' ``apply_chat_template`` tokenizes. Without a limit from the client the
answer may fill the model's context (the prompt counted by the attention node's tokenizer). With
``--reasoning-parser`` the ``<think>`` part comes as ``reasoning_content``.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from . import shapes
from ..admission import Caller
from .door import Door, request_id
from .errors import invalid
from .protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatMessage,
    ChatResponseMessage, DeltaMessage,
)
from .sampling import chat_max_tokens, chat_request
from .sse import DONE, sse_events
from .stream import GenerationStream, until_disconnect
from .template_args import template_arguments


def message_dict(message: ChatMessage, index: int) -> dict:
    """A message as the template sees it: text parts of a list ``content`` joined (other parts refused)."""
    out = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages.{index}.content: only text parts are supported, got "
                              f"type {part.get('type')!r}", f"messages.{index}.content")
            texts.append(part["text"])
        out["content"] = "".join(texts)
    return out


def routes(door: Door) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                     caller: Caller = Depends(door.caller)):
        model, info = await door.model(body.model)
        rid = request_id(request)
        messages = [message_dict(m, i) for i, m in enumerate(body.messages)]
        text = door.template(info).render(messages, **template_arguments(body))
        max_tokens = chat_max_tokens(body)
        if max_tokens is None:  # up to the context: the prompt counted as the generation will encode it
            prompt = await until_disconnect(request, door.path.tokenize(text, add_special_tokens=False))
            max_tokens = info.max_position_embeddings - len(prompt)
        generate = chat_request(body, text, rid, max_tokens)
        stream = GenerationStream(door.path, generate, caller)
        try:
            if body.stream:
                first = await until_disconnect(request, stream.next())  # errors before the first token: HTTP status
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                chunks = _chunks(stream, first, f"chatcmpl-{rid}", model, door.reasoning(), include_usage)
                return EventSourceResponse(sse_events(stream, first, chunks), sep="\n")
            collected = await until_disconnect(request, stream.collect())
        except BaseException:
            await stream.close()
            raise
        return _response(collected, f"chatcmpl-{rid}", model, door.reasoning(), body.logprobs)

    return api


def _response(collected: shapes.Collected, cid: str, model: str, parser, logprobs: bool) -> ChatCompletionResponse:
    text = collected.joined
    reasoning, content = parser.split(text) if parser is not None else (None, text)
    return ChatCompletionResponse(id=cid, model=model, usage=shapes.usage(collected.last), choices=[ChatChoice(
        message=ChatResponseMessage(content=content, reasoning_content=reasoning),
        logprobs=shapes.chat_logprobs(collected.logprobs) if logprobs else None,
        finish_reason=shapes.finish_reason(collected.last))])


def _chunk(cid: str, created: int, model: str, delta: DeltaMessage, *, logprobs=None, finish=None) -> str:
    choice = ChatChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish)
    chunk = ChatCompletionChunk(id=cid, created=created, model=model, choices=[choice])
    return chunk.model_dump_json(exclude={"usage"}, exclude_none=False)


async def _chunks(stream: GenerationStream, first, cid: str, model: str, parser, include_usage: bool):
    created = ChatCompletionChunk(id=cid, model=model, choices=[]).created
    reasoning = parser.stream() if parser is not None else None
    yield _chunk(cid, created, model, DeltaMessage(role="assistant", content=""))  # OpenAI's first chunk
    response, last = first, first
    while response is not None:
        finish = shapes.finish_reason(response)
        think, text = reasoning.push(response.text) if reasoning is not None else ("", response.text)
        if finish and reasoning is not None:  # the end: whatever the parser held back
            more_think, more_text = reasoning.flush()
            think, text = think + more_think, text + more_text
        if think or text or finish or response.logprobs:
            delta = DeltaMessage(content=text or None, reasoning_content=think or None)
            logprobs = shapes.chat_logprobs(response.logprobs) if response.logprobs else None
            yield _chunk(cid, created, model, delta, logprobs=logprobs, finish=finish)
        last, response = response, await stream.next()
    if include_usage and last is not None:  # OpenAI's final chunk: usage, no choices
        yield json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                          "choices": [], "usage": shapes.usage(last).model_dump()})
    yield DONE
