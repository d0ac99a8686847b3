"""Who the HTTP door answers: the gRPC port's credentials, checked before the body is read (through the app)."""

from __future__ import annotations

import asyncio

import httpx2 as httpx
import pytest

from moemesh.router.openai_api.app import create_app
from moemesh.router.openai_api.auth import HttpAuth
from moemesh.router.openai_api.door import Door
from moemesh.router.openai_api.errors import APIError
from moemesh.wire.authz import Authenticator
from moemesh.wire.identity import TokenBook

from .test_chat_template_args import EchoPath

CLIENT, ROUTER = "client-key", "router-key"


def _post(auth: Authenticator, path: str, body: dict, key: str | None = None) -> httpx.Response:
    app = create_app(Door(EchoPath(), HttpAuth(auth)))
    headers = {} if key is None else {"authorization": f"Bearer {key}"}

    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://door.test") as c:
            return await c.post(path, json=body, headers=headers)
    return asyncio.run(post())


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.mark.parametrize("auth", [
    Authenticator(tokens=TokenBook({"client": CLIENT})),
    Authenticator(tokens=TokenBook({"router": ROUTER, "attn": "attn-key"})),  # only other roles' tokens
    Authenticator(mtls=True, tokens=TokenBook({"client": CLIENT})),
], ids=["client-tokens", "other-roles-only", "mtls-and-client-tokens"])
def test_an_anonymous_caller_is_refused_whenever_the_router_has_tokens(auth):
    r = _post(auth, "/v1/chat/completions", CHAT)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), r.text
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_the_key_is_checked_before_the_body():
    auth = Authenticator(tokens=TokenBook({"client": CLIENT}))
    r = _post(auth, "/v1/chat/completions", {"messages": "not a list", "temperature": -1})
    assert r.status_code == 401, r.text  # not a 400 describing the API to an anonymous caller
    assert _post(auth, "/v1/chat/completions", {"messages": "not a list"}, key=CLIENT).status_code == 400


def test_roles_and_keys():
    auth = Authenticator(tokens=TokenBook({"client": CLIENT, "router": ROUTER}))
    assert _post(auth, "/v1/chat/completions", CHAT, key=CLIENT).status_code == 200
    assert _post(auth, "/v1/chat/completions", CHAT, key="wrong").status_code == 401
    denied = _post(auth, "/v1/chat/completions", CHAT, key=ROUTER)
    assert denied.status_code == 403 and "router" in denied.json()["error"]["message"]


def test_open_without_credentials_and_with_mtls_alone():
    assert _post(Authenticator(), "/v1/chat/completions", CHAT).status_code == 200
    # mTLS with no client/operator token: the TLS handshake checked the certificate before the app runs.
    assert not HttpAuth(Authenticator(mtls=True)).needs_token
    assert not HttpAuth(Authenticator(mtls=True, tokens=TokenBook({"router": ROUTER}))).needs_token
    with pytest.raises(APIError):
        HttpAuth(Authenticator(tokens=TokenBook({"router": ROUTER}))).check(None)


def test_template_kwargs_named_like_render_parameters_are_template_variables_not_a_500():
    r = _post(Authenticator(), "/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"self": 1, "kwargs": 2}})
    assert r.status_code == 200, r.text
