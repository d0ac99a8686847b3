"""Domain errors shared by every role; servers map them to gRPC status codes in one table."""

from __future__ import annotations


class MoemeshError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class InvalidRequestError(MoemeshError, ValueError):
    """The request itself is wrong (bad ids, lengths, sampling ranges): fix the request."""


class ResourceExhaustedError(MoemeshError):
    """A bounded queue or cache is full right now: retry later or send less."""
