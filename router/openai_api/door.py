"""What every endpoint of the HTTP door shares: the router's request path, credentials, the model's name,
its chat template and reasoning parser, and request ids.

The door calls :class:`~router.generation.GenerationPath` directly (the same admission, node selection,
failover and resume as gRPC), never the router's own gRPC port.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import structlog
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moemesh.errors import InvalidRequestError
from moemesh.model.chat_template import ChatTemplate
from moemesh.v1 import inference_pb2
from moemesh.wire.requests import check_request_id

from ..generation import GenerationPath
from .auth import HttpAuth, http_caller
from .errors import APIError
from .reasoning import reasoning_parser

REQUEST_ID_HEADER = "x-request-id"


@dataclass(frozen=True)
class DoorOptions:
    """``--served-model-name``, ``--chat-template`` (a template's text, overriding the model's) and
    ``--reasoning-parser``."""

    served_model_name: str | None = None
    chat_template: str | None = None
    reasoning_parser: str | None = None

    def __post_init__(self):
        if self.reasoning_parser is not None:
            reasoning_parser(self.reasoning_parser)  # ValueError listing the known parsers


class Door:
    def __init__(self, path: GenerationPath, auth: HttpAuth, options: DoorOptions | None = None):
        self.path, self.auth, self.options = path, auth, options or DoorOptions()

    def caller(self, request: Request):
        """The caller, once its credentials pass (APIError 401/403 otherwise). Endpoints take it as a FastAPI
        dependency, which runs before the body is validated: an anonymous caller learns nothing of the API."""
        self.auth.check(request.headers.get("authorization"))
        return http_caller(request)

    @staticmethod
    def model_name_of(info: inference_pb2.ModelInfoResponse, served: str | None) -> str:
        return served or info.model_name or info.model_type or "moemesh"

    async def model(self, requested: str | None) -> tuple[str, inference_pb2.ModelInfoResponse]:
        """The served model's name and info; 404 when the request names another model."""
        info = await self.path.model_info()
        name = self.model_name_of(info, self.options.served_model_name)
        if requested is not None and requested != name:
            raise APIError(404, f"the model {requested!r} does not exist: this server serves {name!r}",
                           param="model", code="model_not_found")
        return name, info

    def template(self, info: inference_pb2.ModelInfoResponse) -> ChatTemplate:
        text = self.options.chat_template or info.chat_template
        if not text:
            raise APIError(400, "this model has no chat template (tokenizer_config.json chat_template): start the "
                           "router with --chat-template F, or use /v1/completions", param="messages")
        return ChatTemplate(text, dict(info.special_tokens))

    def reasoning(self):
        name = self.options.reasoning_parser
        return None if name is None else reasoning_parser(name)


def request_id(request: Request) -> str:
    return request.scope["state"]["request_id"]


class RequestIdMiddleware:
    """Each request's id: the client's ``x-request-id`` (checked), else a fresh one; sent back in the same
    header and bound to every log line the request writes."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == REQUEST_ID_HEADER.encode()), None)
        rid = given if given else uuid.uuid4().hex
        try:
            check_request_id(rid)
        except InvalidRequestError as exc:
            return await APIError(400, f"{REQUEST_ID_HEADER}: {exc}", param=REQUEST_ID_HEADER).response()(
                scope, receive, send)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=rid):
            await self.app(scope, receive, send_with_id)
