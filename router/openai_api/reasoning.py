"""Reasoning parsers: split a model's ``<think>...</think>`` out of its answer (``--reasoning-parser``).

DeepSeek-R1 writes its chain of thought first and closes it with ``</think>``. Its chat
template already ends the prompt with ``<think>\\n``, so the output usually has no start
tag (R1-0528 and distills may repeat it). The ``deepseek-r1`` parser behaves as vLLM's
``deepseek_r1`` and SGLang's ``deepseek-r1`` (which forces reasoning mode):

* a ``<think>`` at the very start of the output is dropped;
* everything up to the first ``</think>`` is reasoning, everything after it is content
  (a later ``</think>`` stays in the content);
* with no ``</think>`` at all -- the model was cut off by max_tokens while thinking --
  the whole output is reasoning and the content is None. vLLM (since 0.8) and SGLang
  both answer that way, streamed or not, so this parser does too.

Choices where vLLM is silent or inconsistent, made so that streaming and non-streaming
always agree (the concatenated stream equals ``split`` of the whole text):

* an empty part is None (vLLM returns ``""`` for an empty reasoning, None for an empty
  content; an absent field is what clients test for);
* only a *leading* ``<think>`` is stripped (vLLM's non-streaming path drops the first
  one anywhere, its streaming path does not): R1 emits it first or not at all.

Streaming works on text, not token ids, so a tag may arrive in pieces (``</th`` then
``ink>``): text that could still be the start of a tag is held back until the next delta
settles it, or until ``flush`` at the end of the stream.

Pure: no web framework, no tokenizer.
"""

from __future__ import annotations

from typing import Protocol

THINK_START, THINK_END = "<think>", "</think>"


def _held_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag`` (it may become ``tag``)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkStream:
    """Incremental ``<think>`` splitting for one response: ``push`` each text delta, then ``flush``.

    Each call returns ``(reasoning_delta, content_delta)``; either may be ``""``.
    """

    _START, _REASONING, _CONTENT = "start", "reasoning", "content"

    def __init__(self) -> None:
        self._state = self._START
        self._held = ""  # text not yet emitted because it may be (part of) a tag

    def push(self, delta: str) -> tuple[str, str]:
        if self._state == self._CONTENT:
            return "", delta
        text = self._held + delta
        self._held = ""
        if self._state == self._START:
            if THINK_START.startswith(text):  # still a possible leading <think> (or empty)
                self._held = text
                return "", ""
            self._state = self._REASONING
            text = text.removeprefix(THINK_START)
        end = text.find(THINK_END)
        if end >= 0:
            self._state = self._CONTENT
            return text[:end], text[end + len(THINK_END):]
        keep = _held_suffix(text, THINK_END)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], ""

    def flush(self) -> tuple[str, str]:
        """The end of the stream: what was held back was never a full tag, so it is reasoning."""
        held, self._held = self._held, ""
        if self._state == self._START:
            self._state = self._REASONING
            held = "" if held == THINK_START else held
        return held, ""


class DeepSeekR1ReasoningParser:
    """``deepseek-r1``: reasoning up to the first ``</think>`` (see the module docstring for the rules)."""

    name = "deepseek-r1"

    def split(self, text: str) -> tuple[str | None, str | None]:
        """``(reasoning_content, content)`` of a whole output; an empty part is None."""
        text = text.removeprefix(THINK_START)
        reasoning, found, content = text.partition(THINK_END)
        if not found:
            return reasoning or None, None
        return reasoning or None, content or None

    def stream(self) -> ThinkStream:
        return ThinkStream()


class ReasoningStream(Protocol):
    def push(self, delta: str) -> tuple[str, str]: ...
    def flush(self) -> tuple[str, str]: ...


class ReasoningParser(Protocol):
    def split(self, text: str) -> tuple[str | None, str | None]: ...
    def stream(self) -> ReasoningStream: ...


# "deepseek-r1" as SGLang spells it, "deepseek_r1" as vLLM does: the same parser.
REASONING_PARSERS: dict[str, type] = {
    "deepseek-r1": DeepSeekR1ReasoningParser,
    "deepseek_r1": DeepSeekR1ReasoningParser,
}


def reasoning_parser(name: str) -> ReasoningParser:
    """The parser called ``name`` (``--reasoning-parser``); ValueError listing the known names otherwise."""
    cls = REASONING_PARSERS.get(name)
    if cls is None:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of: {', '.join(sorted(REASONING_PARSERS))}")
    return cls()
