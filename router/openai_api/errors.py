"""OpenAI's error JSON ``{"error": {"message", "type", "param", "code"}}`` and the HTTP status of every error.

:func:`api_error` maps the router's domain errors (and an attention node's own status,
:class:`~router.generation.NodeStatusError`) to HTTP: invalid request 400, unauthenticated 401, unknown
model 404, over a limit 429, no capacity or unservable 503, the rest 500. :func:`install` makes FastAPI
answer its own validation errors (pydantic) with 400 in the same shape, as vLLM does.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from moemesh.errors import (
    DeadlineExceededError, FailedPreconditionError, InvalidRequestError, MoemeshError, NotFoundError,
    ResourceExhaustedError, UnauthenticatedError, UnavailableError,
)
from moemesh.logs import get_logger

from ..generation import NodeStatusError
from .stream import ClientGone

log = get_logger("moemesh.router.http")

# HTTP status -> OpenAI's error type.
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable_error",
         504: "timeout_error", 500: "server_error"}
_BY_CODE = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
            grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
            grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
            grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
            grpc.StatusCode.DEADLINE_EXCEEDED: 504}
_BY_CLASS: tuple[tuple[type[BaseException], int], ...] = (
    (InvalidRequestError, 400), (FailedPreconditionError, 400), (UnauthenticatedError, 401), (NotFoundError, 404),
    (ResourceExhaustedError, 429), (UnavailableError, 503), (DeadlineExceededError, 504))


@dataclass
class APIError(Exception):
    """An error answer: HTTP ``status``, OpenAI's ``message``/``type``/``param``/``code``."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    @property
    def type(self) -> str:
        return TYPES.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else str(self.status)}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error(exc: BaseException) -> APIError:
    """The HTTP answer for a failure of the request path."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, NodeStatusError):
        return APIError(_BY_CODE.get(exc.code, 500), exc.details, code=exc.code.name.lower())
    if isinstance(exc, MoemeshError):
        status = next((s for kind, s in _BY_CLASS if isinstance(exc, kind)), 500)
        return APIError(status, str(exc) or type(exc).__name__)
    return APIError(500, f"internal error: {type(exc).__name__}")


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming every bad field (``messages.0.role: Field required``), and the first field."""
    parts, first = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        name = ".".join(loc) or "body"
        first = first or name
        parts.append(f"{name}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body", first


def install(app: FastAPI) -> None:
    """Every error the app answers comes in OpenAI's shape."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return APIError(400, message, param=param).response()

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(MoemeshError)
    async def _domain(request: Request, exc: MoemeshError):
        return api_error(exc).response()

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        log.info("http_client_gone", path=request.url.path)
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("http_internal_error", path=request.url.path)
        return api_error(exc).response()
