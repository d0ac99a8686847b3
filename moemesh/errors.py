"""Domain errors shared by every role; servers map them to gRPC status codes in one table."""

from __future__ import annotations


class MoemeshError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class InvalidRequestError(MoemeshError, ValueError):
    """The request itself is wrong (bad ids, lengths, sampling ranges): fix the request."""


class ResourceExhaustedError(MoemeshError):
    """A bounded queue or cache is full right now: retry later or send less."""


class NotFoundError(MoemeshError, LookupError):
    """The thing the request names does not exist (the message lists what does)."""


class UnauthenticatedError(MoemeshError):
    """The caller did not prove who it is (missing or wrong token or certificate)."""


class UnavailableError(MoemeshError):
    """Nothing can serve the request right now (no ready node, shutting down): retry, maybe elsewhere."""


class UnservableError(UnavailableError):
    """The live expert nodes cannot host every expert and no re-plan can fix it: retrying does not help until
    an expert node joins or returns (clients are told not to retry; see moemesh.wire.status.NO_RETRY)."""


class FailedPreconditionError(MoemeshError):
    """The request is fine but this server is not in a state to serve it (e.g. no tokenizer): do not retry here."""


class DeadlineExceededError(MoemeshError, TimeoutError):
    """The work did not finish within the caller's deadline; it may still complete in the background."""
