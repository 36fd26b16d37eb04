"""Domain errors shared by the gateway and the worker.

Each error names its kind in ``code``; the servicer's error module maps that kind to a gRPC status code in
one place. Nothing here imports grpc: fetch, decode and engine code raise these plain exceptions.

Messages are shown to the caller, so they say what was wrong and what is allowed
("audio is 3600.0 s long; the limit is 600 s") and never carry secrets or internal details.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

QUOTE_LIMIT = 64  # characters of user input an error message repeats at most


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``value`` for an error message or a log line: its repr, cut to ``limit`` characters with the total
    length noted, so a refusal never repeats a megabyte of input (gRPC caps a status's size: a longer
    message would turn the refusal into RESOURCE_EXHAUSTED "metadata size exceeds hard limit")."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class ErrorCode(StrEnum):
    """The kinds of failure a caller can see (each maps to one gRPC status code)."""

    INVALID_ARGUMENT = "invalid_argument"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"


class OmnigateError(Exception):
    """Base of every Omnigate domain error; ``code`` names the kind, ``message`` is safe to show."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(OmnigateError):
    """The request (or media it points to) is malformed or unusable."""

    code = ErrorCode.INVALID_ARGUMENT


class Unauthenticated(OmnigateError):
    """The caller presented no credential, or one this deployment does not accept."""

    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(OmnigateError):
    """The request asks for something this deployment does not allow."""

    code = ErrorCode.PERMISSION_DENIED


class LimitExceeded(OmnigateError):
    """Something is over a configured limit (media size or length, queue depth, tokens).

    ``retry_after_s`` is set only when retrying later can help (a full queue), not for input that is
    simply too big.
    """

    code = ErrorCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(OmnigateError):
    """The service cannot take the request now (not ready, draining, backend down).

    ``retry_after_s`` is set when the service knows when retrying makes sense (no worker yet: a cold start).
    """

    code = ErrorCode.UNAVAILABLE

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(OmnigateError):
    """An operation ran past its time limit."""

    code = ErrorCode.DEADLINE_EXCEEDED


class InternalError(OmnigateError):
    """A bug or unexpected failure; callers see a generic message, details go to the log."""

    code = ErrorCode.INTERNAL
