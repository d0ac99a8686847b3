"""PLACEHOLDER (helper "door"'s worktree only; helper "chat" owns this file: the merge takes theirs).

The agreed interface, minimal: ``deepseek-r1`` splits ``<think>...</think>`` off the answer.
"""

from __future__ import annotations

START, END = "<think>", "</think>"


class DeepSeekR1Stream:
    def __init__(self):
        self._buffer, self._done = "", False

    def push(self, delta: str) -> tuple[str, str]:
        if self._done:
            return "", delta
        self._buffer += delta
        if END in self._buffer:
            reasoning, _, content = self._buffer.partition(END)
            self._buffer, self._done = "", True
            return reasoning.removeprefix(START), content
        keep = next((n for n in range(len(END) - 1, 0, -1) if self._buffer.endswith(END[:n])), 0)
        out = self._buffer[: len(self._buffer) - keep]
        self._buffer = self._buffer[len(out):]
        if out.startswith(START):
            out = out[len(START):]
        return out, ""

    def flush(self) -> tuple[str, str]:
        out, self._buffer = self._buffer, ""
        return ("", out) if self._done else (out, "")


class DeepSeekR1Parser:
    def split(self, text: str) -> tuple[str | None, str | None]:
        if END not in text:
            return text.removeprefix(START) or None, None
        reasoning, _, content = text.partition(END)
        return reasoning.removeprefix(START) or None, content or None

    def stream(self) -> DeepSeekR1Stream:
        return DeepSeekR1Stream()


REASONING_PARSERS: dict[str, type] = {"deepseek-r1": DeepSeekR1Parser}


def reasoning_parser(name: str):
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(sorted(REASONING_PARSERS))}")
    return REASONING_PARSERS[name]()
