"""``OmnigateClientError``: a failed call, with its status code, message, retry delay and request id.

The gateway ends a failed stream with a gRPC status whose ``grpc-status-details-bin`` trailer carries a
``google.rpc.Status`` with an ``ErrorInfo`` (reason, domain) and, when retrying helps, a ``RetryInfo``
(delay). This module reads those for sync and asyncio calls alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"
REQUEST_ID_KEY = "x-request-id"

# gRPC metadata as (key, value) pairs: a tuple, or a sync or asyncio call's metadata object
MetadataPairs = Iterable[tuple[str, str | bytes]]


class OmnigateClientError(grpc.RpcError):
    """A call that ended with a non-OK gRPC status.

    It is a ``grpc.RpcError`` and answers ``code()`` and ``details()`` like one, so code written against
    plain gRPC errors keeps working. Beyond that:

    - ``code()``: the ``grpc.StatusCode`` (``status_name`` is its name, e.g. ``"INVALID_ARGUMENT"``),
    - ``message``: the server's message (what was wrong and what is allowed),
    - ``retry_after``: seconds the server asked to wait before retrying (``RetryInfo``), else None,
    - ``request_id``: the gateway's request id (``x-request-id``), when it sent one,
    - ``reason`` / ``domain``: the ``ErrorInfo`` of the status, when present,
    - ``attempts``: how many attempts were made (more than 1 when retries happened).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        retry_after: float | None = None,
        request_id: str | None = None,
        reason: str | None = None,
        domain: str | None = None,
        attempts: int = 1,
        initial_metadata: tuple = (),
        trailing_metadata: tuple = (),
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self._code = code
        self.message = message
        self.retry_after = retry_after
        self.request_id = request_id
        self.reason = reason
        self.domain = domain
        self.attempts = attempts
        self._initial_metadata = initial_metadata
        self._trailing_metadata = trailing_metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self.message

    def initial_metadata(self) -> tuple:
        return self._initial_metadata

    def trailing_metadata(self) -> tuple:
        return self._trailing_metadata

    @property
    def status_name(self) -> str:
        return self._code.name

    def __str__(self) -> str:
        text = f"{self._code.name}: {self.message}"
        if self.retry_after is not None:
            text += f" (retry after {self.retry_after:g} s)"
        if self.request_id:
            text += f" [request id {self.request_id}]"
        return text

    def __repr__(self) -> str:
        return f"OmnigateClientError({self._code.name}, {self.message!r}, retry_after={self.retry_after!r})"

    @classmethod
    def from_rpc_error(
        cls,
        error: grpc.RpcError,
        *,
        initial_metadata: MetadataPairs | None = None,
        trailing_metadata: MetadataPairs | None = None,
        attempts: int = 1,
    ) -> OmnigateClientError:
        """Reads code, message, details and request id from a sync or asyncio ``grpc.RpcError``.

        For asyncio calls pass the metadata explicitly (they are awaitables on the call object).
        """
        if isinstance(error, OmnigateClientError):
            return error
        code = _call(error, "code") or grpc.StatusCode.UNKNOWN
        message = _call(error, "details") or ""
        initial = _pairs(
            initial_metadata if initial_metadata is not None else _call(error, "initial_metadata")
        )
        trailing = _pairs(
            trailing_metadata if trailing_metadata is not None else _call(error, "trailing_metadata")
        )
        retry_after, reason, domain = _status_details(trailing)
        request_id = metadata_value(trailing, REQUEST_ID_KEY) or metadata_value(initial, REQUEST_ID_KEY)
        return cls(
            code,
            message,
            retry_after=retry_after,
            request_id=request_id,
            reason=reason,
            domain=domain,
            attempts=attempts,
            initial_metadata=initial,
            trailing_metadata=trailing,
        )


def metadata_value(metadata: MetadataPairs | None, key: str) -> str | None:
    """The first value of ``key`` in gRPC metadata (pairs), as text."""
    for name, value in _pairs(metadata):
        if name.lower() == key:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None


def _pairs(metadata: MetadataPairs | None) -> tuple[tuple[str, str | bytes], ...]:
    if not metadata:
        return ()
    return tuple((item[0], item[1]) for item in metadata)


def _call(error: object, method: str) -> Any:
    """``error.method()`` when the error has it and it returns a plain value (not an awaitable)."""
    fn = getattr(error, method, None)
    if fn is None:
        return None
    try:
        value = fn()
    except Exception:  # noqa: BLE001 - a half-initialised call object; the caller has defaults
        return None
    if hasattr(value, "__await__"):
        close = getattr(value, "close", None)
        if close:
            close()  # an un-awaited coroutine would warn
        return None
    return value


def _status_details(trailing: MetadataPairs) -> tuple[float | None, str | None, str | None]:
    """(RetryInfo delay in seconds, ErrorInfo reason, ErrorInfo domain) from ``grpc-status-details-bin``."""
    raw = next((value for name, value in trailing if name == STATUS_DETAILS_KEY), None)
    if not isinstance(raw, bytes):
        return None, None, None
    status = status_pb2.Status()
    try:
        status.ParseFromString(raw)
    except Exception:  # noqa: BLE001 - malformed details are ignored, the code and message remain
        return None, None, None
    retry_after = reason = domain = None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_after = info.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain = info.reason or None, info.domain or None
    return retry_after, reason, domain
