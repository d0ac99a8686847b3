"""The chat template's arguments for a request: its fields merged with ``chat_template_kwargs`` (pure).

As vLLM does (``serving_engine._preprocess_chat``): the request's ``add_generation_prompt``, ``tools``
and ``documents`` are the base and ``chat_template_kwargs`` override them key by key; the other keys
become template variables (``enable_thinking``, ``thinking``...). vLLM refuses ``chat_template`` and
``tokenize`` there (the template was chosen at start-up; the door tokenizes itself); ``messages`` is the
request's own field, so it is refused too rather than silently replaced.
"""

from __future__ import annotations

from typing import Any

from .errors import invalid
from .protocol import ChatCompletionRequest

FIELD = "chat_template_kwargs"
REFUSED = {"chat_template": "the chat template is the model's (or the router's --chat-template)",
           "tokenize": "the server tokenizes the rendered prompt itself",
           "messages": "send the conversation as the request's messages"}


def template_arguments(body: ChatCompletionRequest) -> dict[str, Any]:
    """Keyword arguments for ``ChatTemplate.render``; APIError 400 naming the key for a refused one.

    (``chat_template_kwargs`` that is not a JSON object is refused by the request's schema.)"""
    kwargs = body.chat_template_kwargs or {}
    for key, why in REFUSED.items():
        if key in kwargs:
            raise invalid(f"{FIELD}.{key} is not accepted: {why}", f"{FIELD}.{key}")
    merged: dict[str, Any] = {"add_generation_prompt": body.add_generation_prompt, "tools": body.tools,
                              "documents": body.documents}
    merged.update(kwargs)
    if not isinstance(merged["add_generation_prompt"], bool):
        raise invalid(f"{FIELD}.add_generation_prompt must be true or false", f"{FIELD}.add_generation_prompt")
    for key, what in (("tools", "a list of objects (JSON schemas of functions)"),
                      ("documents", "a list of objects ({title, text})")):
        value = merged[key]
        if value is not None and not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
            where = f"{FIELD}.{key}" if key in kwargs else key
            raise invalid(f"{where} must be {what}", where)
    return merged
