"""PLACEHOLDER (helper "door"'s worktree only; helper "chat" owns this file: the merge takes theirs).

The agreed interface, minimal: a tokenizer_config.json ``chat_template`` rendered with jinja2 in a sandbox.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moemesh.errors import InvalidRequestError


class ChatTemplateError(InvalidRequestError):
    """The template raised, or cannot render these messages."""


def _raise(message: str):
    raise ChatTemplateError(message)


@dataclass(frozen=True)
class ChatTemplate:
    template: str
    special_tokens: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, model_dir) -> ChatTemplate | None:
        path = Path(model_dir) / "tokenizer_config.json"
        if not path.exists():
            return None
        config = json.loads(path.read_text())
        template = config.get("chat_template")
        if not isinstance(template, str):
            return None
        tokens = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
        return cls(template, tokens)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True, tools: list[dict] | None = None,
               **kwargs) -> str:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            return env.from_string(self.template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                         tools=tools, **self.special_tokens, **kwargs)
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template cannot render these messages: {exc}") from None
