"""The one table from domain errors to gRPC status codes, and the interceptor that applies it everywhere.

Servicers raise domain errors (``moemesh.errors``) or call :func:`abort`; :func:`status_for` picks the
code by the error's most specific class in :data:`STATUS`, so a subclass (``CodecError`` of
``InvalidRequestError``) maps like its parent unless the table names it. Every server built by
:func:`moemesh.wire.server.create_server` carries :class:`StatusInterceptor` (``SyncStatusInterceptor``
for thread-pool servers), which

- answers INVALID_ARGUMENT when request bytes do not parse (gRPC alone says UNKNOWN or INTERNAL), and
  the server goes on serving;
- turns a domain error raised by a servicer into its status, with the error's message as details.
"""

from __future__ import annotations

import inspect

import grpc

from moemesh.errors import (
    DeadlineExceededError, FailedPreconditionError, InvalidRequestError, MoemeshError, NotFoundError,
    ResourceExhaustedError, UnauthenticatedError, UnavailableError, UnservableError,
)
from moemesh.expert_backend import ExpertBackendError
from moemesh.text import MAX_DETAILS_CHARS, shorten

Code = grpc.StatusCode

STATUS: dict[type[BaseException], grpc.StatusCode] = {
    InvalidRequestError: Code.INVALID_ARGUMENT,  # also CodecError, SpecError
    NotFoundError: Code.NOT_FOUND,
    ResourceExhaustedError: Code.RESOURCE_EXHAUSTED,
    FailedPreconditionError: Code.FAILED_PRECONDITION,
    UnauthenticatedError: Code.UNAUTHENTICATED,
    UnavailableError: Code.UNAVAILABLE,  # also RegistryUnavailable (etcd does not answer)
    ExpertBackendError: Code.UNAVAILABLE,  # routed experts unreachable: another attention node may do better
    DeadlineExceededError: Code.DEADLINE_EXCEEDED,
    MoemeshError: Code.INTERNAL,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The code for ``exc``: its most specific class in STATUS; a peer's RpcError keeps its own; else INTERNAL."""
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return exc.code()
    return next((STATUS[kind] for kind in type(exc).__mro__ if kind in STATUS), Code.INTERNAL)


def details_of(exc: BaseException) -> str:
    """The status message: the error's, cut to MAX_DETAILS_CHARS whatever it quotes (a peer's details too)."""
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "details", None)):
        return shorten(exc.details() or exc.code().name, MAX_DETAILS_CHARS)
    return shorten(str(exc) or type(exc).__name__, MAX_DETAILS_CHARS)


# Trailing metadata of an UNAVAILABLE that retrying cannot fix (UnservableError): gRPC's server retry pushback
# (retry design A6), where a negative value means "do not retry". gRPC clients with a retry policy honour it;
# the mesh's SDK (router/client.py) reads it too.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
NO_RETRY = ((RETRY_PUSHBACK_KEY, "-1"),)


def no_retry(metadata) -> bool:
    """True when a call's trailing ``metadata`` (pairs) carries :data:`NO_RETRY`."""
    return any(key == RETRY_PUSHBACK_KEY and str(value).startswith("-") for key, value in metadata or ())


def trailing_metadata(err: grpc.RpcError):
    """A failed call's trailing metadata (pairs), () when the error carries none."""
    get = getattr(err, "trailing_metadata", None)
    return (get() if callable(get) else None) or ()


def abort(context, exc: BaseException):
    """End the call with ``exc``'s status and message (and :data:`NO_RETRY` for an UnservableError).

    ``await abort(context, exc)`` in a grpc.aio servicer; ``abort(context, exc)`` in a sync one (it raises).
    """
    if isinstance(exc, UnservableError) or (isinstance(exc, grpc.RpcError) and no_retry(trailing_metadata(exc))):
        return context.abort(status_for(exc), details_of(exc), trailing_metadata=NO_RETRY)
    return context.abort(status_for(exc), details_of(exc))


class _Undecodable:
    """What a request deserializer yields for bytes that do not parse: the behaviour answers INVALID_ARGUMENT."""

    def __init__(self, error: Exception):
        self.error = InvalidRequestError(f"the request message does not parse: {error}")


def _lenient(deserializer):
    if deserializer is None:  # the method takes raw bytes and parses them itself
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a custom deserializer raises
            return _Undecodable(exc)

    return parse


def _kind(handler) -> str:
    return {(False, False): "unary_unary", (False, True): "unary_stream", (True, False): "stream_unary",
            (True, True): "stream_stream"}[(handler.request_streaming, handler.response_streaming)]


def _wrapped(handler, wrap):
    if handler is None:
        return None
    kind = _kind(handler)
    # Raw-bytes methods (no deserializer) parse for themselves: nothing to check on their request stream.
    check_stream = handler.request_streaming and handler.request_deserializer is not None
    return handler._replace(request_deserializer=_lenient(handler.request_deserializer),
                            **{kind: wrap(getattr(handler, kind), check_stream, handler.response_streaming)})


# ---- grpc.aio --------------------------------------------------------------------------------------------------
async def _checked_requests(requests):
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise request.error
        yield request


def _wrap_aio(behavior, check_stream: bool, response_streaming: bool):
    def inputs(request):
        if check_stream:
            return _checked_requests(request)
        if isinstance(request, _Undecodable):
            raise request.error
        return request

    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            responses = None
            try:
                responses = behavior(inputs(request), context)
                async for response in responses:
                    yield response
            except MoemeshError as exc:
                await abort(context, exc)
            finally:
                if responses is not None:
                    await responses.aclose()  # a cancelled call runs the servicer's cleanup now, not at GC
        return stream

    async def call(request, context):
        try:
            return await behavior(inputs(request), context)
        except MoemeshError as exc:
            await abort(context, exc)
    return call


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """For grpc.aio servers: undecodable requests and domain errors become status codes (see the module doc)."""

    async def intercept_service(self, continuation, handler_call_details):
        return _wrapped(await continuation(handler_call_details), _wrap_aio)


# ---- sync (thread-pool) servers ------------------------------------------------------------------------------
def _checked_requests_sync(requests):
    for request in requests:
        if isinstance(request, _Undecodable):
            raise request.error
        yield request


def _wrap_sync(behavior, check_stream: bool, response_streaming: bool):
    def inputs(request):
        if check_stream:
            return _checked_requests_sync(request)
        if isinstance(request, _Undecodable):
            raise request.error
        return request

    if response_streaming:
        def stream(request, context):
            try:
                yield from behavior(inputs(request), context)
            except MoemeshError as exc:
                abort(context, exc)
        return stream

    def call(request, context):
        try:
            return behavior(inputs(request), context)
        except MoemeshError as exc:
            abort(context, exc)
    return call


class SyncStatusInterceptor(grpc.ServerInterceptor):
    """For thread-pool ``grpc.server``s: the same as :class:`StatusInterceptor`."""

    def intercept_service(self, continuation, handler_call_details):
        return _wrapped(continuation(handler_call_details), _wrap_sync)
