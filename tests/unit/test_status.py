"""moemesh.wire.status: the one table from domain errors to gRPC status codes."""

from __future__ import annotations

import grpc
import pytest

from moemesh.control.etcd import RegistryError, RegistryUnavailable
from moemesh.control.placement import SpecError
from moemesh.errors import (
    DeadlineExceededError, FailedPreconditionError, InvalidRequestError, MoemeshError, NotFoundError,
    ResourceExhaustedError, UnauthenticatedError, UnavailableError,
)
from moemesh.expert_backend import ExpertBackendError
from moemesh.wire.codec import CodecError
from moemesh.wire.status import abort, status_for

pytestmark = pytest.mark.unit
Code = grpc.StatusCode


@pytest.mark.parametrize("exc, code", [
    (InvalidRequestError("x"), Code.INVALID_ARGUMENT),
    (CodecError("x"), Code.INVALID_ARGUMENT),
    (SpecError("x"), Code.INVALID_ARGUMENT),
    (NotFoundError("x"), Code.NOT_FOUND),
    (ResourceExhaustedError("x"), Code.RESOURCE_EXHAUSTED),
    (FailedPreconditionError("x"), Code.FAILED_PRECONDITION),
    (UnauthenticatedError("x"), Code.UNAUTHENTICATED),
    (UnavailableError("x"), Code.UNAVAILABLE),
    (ExpertBackendError("x"), Code.UNAVAILABLE),
    (RegistryUnavailable("x"), Code.UNAVAILABLE),
    (RegistryError("x"), Code.INTERNAL),
    (DeadlineExceededError("x"), Code.DEADLINE_EXCEEDED),
    (MoemeshError("x"), Code.INTERNAL),
    (RuntimeError("x"), Code.INTERNAL),
])  # fmt: skip
def test_status_for(exc, code):
    assert status_for(exc) is code


class _Peer(grpc.RpcError):
    def code(self):
        return Code.PERMISSION_DENIED

    def details(self):
        return "not yours"


class _Context:
    def __init__(self):
        self.aborted = None

    def abort(self, code, details):
        self.aborted = (code, details)
        raise RuntimeError("aborted")  # as grpc's sync context does


def test_abort_passes_a_peers_status_through_and_names_the_error():
    ctx = _Context()
    with pytest.raises(RuntimeError, match="aborted"):
        abort(ctx, _Peer())
    assert ctx.aborted == (Code.PERMISSION_DENIED, "not yours")
    with pytest.raises(RuntimeError, match="aborted"):
        abort(ctx, NotFoundError("no expert node named 'x'"))
    assert ctx.aborted == (Code.NOT_FOUND, "no expert node named 'x'")
