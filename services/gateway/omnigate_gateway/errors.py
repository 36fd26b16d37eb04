"""The gateway's domain errors: the shared kinds plus the ones only fetching and decoding raise.

No grpc here; the servicer maps ``OmnigateError.code`` to a status code. Kinds:

- ``MediaDecodeError`` (invalid_argument): the bytes are not decodable media of the expected kind.
- ``MediaFetchError`` (invalid_argument): the user's URL or path could not be read (unreachable host,
  HTTP error status, too many redirects, missing file). It is the caller's input that is bad.
- ``MediaFetchTimeout`` (deadline_exceeded): fetching took longer than the configured timeout.
- ``MediaDecodeTimeout`` (deadline_exceeded): decoding ran past its time limit or the request's deadline.
- ``DecodeCancelled``: the request went away while its media was decoding. It only ends the decoding
  thread early; no caller ever sees it (the RPC is already cancelled).
- ``ForbiddenSource`` (permission_denied): the URL scheme, destination address or local path is not
  allowed by this deployment.
- ``LimitExceeded`` (resource_exhausted): media over a size, length, pixel or frame limit.
"""

from __future__ import annotations

from omnigate.errors import (
    DeadlineExceeded,
    ErrorCode,
    InternalError,
    InvalidInput,
    LimitExceeded,
    OmnigateError,
    PermissionDenied,
    Unavailable,
)

__all__ = [
    "DeadlineExceeded",
    "DecodeCancelled",
    "ErrorCode",
    "ForbiddenSource",
    "InternalError",
    "InvalidInput",
    "LimitExceeded",
    "MediaDecodeError",
    "MediaDecodeTimeout",
    "MediaFetchError",
    "MediaFetchTimeout",
    "OmnigateError",
    "PermissionDenied",
    "Unavailable",
]


class MediaDecodeError(InvalidInput):
    """The media bytes are corrupt, truncated, empty or of the wrong kind."""


class MediaFetchError(InvalidInput):
    """The media URL or local path could not be read (the caller's source is at fault)."""


class MediaFetchTimeout(DeadlineExceeded):
    """Fetching the media took longer than the configured timeout."""


class ForbiddenSource(PermissionDenied):
    """The URL scheme, destination address or local path is not allowed here."""


class MediaDecodeTimeout(DeadlineExceeded):
    """Decoding took longer than its time limit, or the request's deadline passed while decoding."""


class DecodeCancelled(OmnigateError):
    """The request was cancelled (its client went away) while its media was being decoded."""
