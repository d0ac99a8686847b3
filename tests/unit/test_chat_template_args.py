"""chat_template_kwargs merged with the request's fields as vLLM does (the kwargs win), through the door's app.

A fake request path echoes the prompt it was sent, so each test sees exactly what the template rendered.
"""

from __future__ import annotations

import asyncio

import httpx2 as httpx
import pytest

from moemesh.router.openai_api.app import create_app
from moemesh.router.openai_api.auth import HttpAuth
from moemesh.router.openai_api.door import Door, DoorOptions
from moemesh.router.openai_api.errors import APIError
from moemesh.router.openai_api.protocol import ChatCompletionRequest
from moemesh.router.openai_api.template_args import template_arguments
from moemesh.v1 import inference_pb2
from moemesh.wire.authz import Authenticator

# Prints every variable the merge may set, so the echoed prompt shows what the template saw.
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
            "|gen={{ add_generation_prompt }}|tools={{ tools | tojson }}|docs={{ documents | tojson }}"
            "|think={{ enable_thinking | default('unset') }}")
MESSAGES = [{"role": "user", "content": "hi"}]


class EchoPath:
    """The request path's surface the chat endpoint uses; generate answers the prompt text back."""

    async def model_info(self):
        return inference_pb2.ModelInfoResponse(chat_template=TEMPLATE, model_name="echo",
                                               max_position_embeddings=64)

    async def tokenize(self, text, *, add_special_tokens=True):
        return list(range(3))

    async def generate(self, request, caller, hooks):
        yield inference_pb2.GenerateResponse(request_id=request.request_id, text=request.text, token_ids=[1],
                                             finish_reason="length",
                                             usage=inference_pb2.Usage(prompt_tokens=3, completion_tokens=1))


def _chat(options: DoorOptions | None = None, **fields) -> httpx.Response:
    app = create_app(Door(EchoPath(), HttpAuth(Authenticator()), options))

    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://door.test") as c:
            return await c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1, **fields})
    return asyncio.run(post())


def _rendered(**fields) -> str:
    r = _chat(**fields)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


TOOL = {"type": "function", "function": {"name": "f"}}
DOC = {"title": "t", "text": "x"}


def test_kwargs_override_the_request_fields_and_add_variables():
    assert _rendered() == "[user:hi]|gen=True|tools=null|docs=null|think=unset"
    assert _rendered(add_generation_prompt=False, tools=[TOOL], documents=[DOC]) == (
        '[user:hi]|gen=False|tools=[{"type": "function", "function": {"name": "f"}}]|docs=[{"title": "t", '
        '"text": "x"}]|think=unset')
    # the kwargs win, as in vLLM (they used to be a TypeError: a 500)
    assert _rendered(add_generation_prompt=True, tools=[TOOL], chat_template_kwargs={
        "add_generation_prompt": False, "tools": None, "documents": [DOC], "enable_thinking": False}) == (
        '[user:hi]|gen=False|tools=null|docs=[{"title": "t", "text": "x"}]|think=False')


@pytest.mark.parametrize("fields, param", [
    ({"chat_template_kwargs": "yes"}, "chat_template_kwargs"),
    ({"chat_template_kwargs": ["a"]}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat_template_kwargs.chat_template"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),
    ({"chat_template_kwargs": {"add_generation_prompt": "no"}}, "chat_template_kwargs.add_generation_prompt"),
    ({"chat_template_kwargs": {"tools": "f"}}, "chat_template_kwargs.tools"),
    ({"chat_template_kwargs": {"documents": [1]}}, "chat_template_kwargs.documents"),
    ({"documents": "d"}, "documents"),
])
def test_bad_kwargs_are_400_naming_the_key(fields, param):
    r = _chat(**fields)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and param in error["message"]


def test_template_arguments_is_the_merge():
    body = ChatCompletionRequest(messages=MESSAGES, tools=[TOOL], chat_template_kwargs={"thinking": True})
    assert template_arguments(body) == {"add_generation_prompt": True, "tools": [TOOL], "documents": None,
                                        "thinking": True}
    with pytest.raises(APIError) as err:
        template_arguments(ChatCompletionRequest(messages=MESSAGES, chat_template_kwargs={"tools": [3]}))
    assert err.value.status == 400


def test_the_routers_chat_template_wins_over_the_models():
    r = _chat(DoorOptions(chat_template="{{ messages[0]['content'] }}!{{ shout | default('') }}"),
              chat_template_kwargs={"shout": "?"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hi!?"
