"""The mesh's GenerateResponses -> OpenAI's shapes (pure: exact outputs are unit-tested).

Logprobs: chat's ``choices[].logprobs.content[{token, logprob, bytes, top_logprobs}]`` and the legacy
completions' ``{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`` (offsets into
the completion text, counted from the tokens' own strings, as vLLM does). A logprob of -inf (a token the
filters ruled out) is not JSON: it is sent as -9999.0, as vLLM does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from moemesh.v1 import inference_pb2

from .protocol import ChatLogprobEntry, ChatLogprobs, CompletionLogprobs, TopLogprobEntry, UsageInfo

FLOOR = -9999.0


def _lp(value: float) -> float:
    return FLOOR if math.isnan(value) or value < FLOOR else float(value)


def usage(response: inference_pb2.GenerateResponse) -> UsageInfo:
    p, c = response.usage.prompt_tokens, response.usage.completion_tokens
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def finish_reason(response: inference_pb2.GenerateResponse) -> str | None:
    """The last response's finish reason (the node says "stop" or "length"), None mid-stream."""
    return response.finish_reason or None


def chat_logprobs(entries: Iterable[inference_pb2.TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatLogprobEntry(token=e.token, logprob=_lp(e.logprob), bytes=list(e.token.encode()),
                         top_logprobs=[TopLogprobEntry(token=t.token, logprob=_lp(t.logprob),
                                                       bytes=list(t.token.encode())) for t in e.top])
        for e in entries])


def completion_logprobs(entries: Iterable[inference_pb2.TokenLogprob], k: int, offset: int = 0) -> CompletionLogprobs:
    """``offset``: the completion text's length before these tokens (for stream chunks after the first)."""
    out = CompletionLogprobs()
    for e in entries:
        out.text_offset.append(offset)
        offset += len(e.token)
        out.tokens.append(e.token)
        out.token_logprobs.append(_lp(e.logprob))
        out.top_logprobs.append(_top_dict(e.top) if k > 0 else None)
    return out


def _top_dict(top: Iterable[inference_pb2.TopLogprob]) -> dict[str, float]:
    """``{token text: logprob}``, most likely first; two tokens with the same text (bytes of one character,
    each shown as U+FFFD) keep the likelier, so the sampled token's entry is its own logprob."""
    out: dict[str, float] = {}
    for t in top:
        out.setdefault(t.token, _lp(t.logprob))
    return out


def next_offset(logprobs: CompletionLogprobs) -> int:
    """The text offset after ``logprobs``' tokens."""
    if not logprobs.tokens:
        return 0
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1])


class Collected:
    """A whole (non-streamed) generation: its text, token ids, logprobs and last response."""

    def __init__(self):
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[inference_pb2.TokenLogprob] = []
        self.last: inference_pb2.GenerateResponse | None = None

    def add(self, response: inference_pb2.GenerateResponse) -> None:
        self.text.append(response.text)
        self.token_ids.extend(response.token_ids)
        self.logprobs.extend(response.logprobs)
        self.last = response

    @property
    def joined(self) -> str:
        return "".join(self.text)
