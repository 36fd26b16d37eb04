"""Maps domain errors to gRPC statuses with google.rpc.Status details, in one place for both services.

| error kind          | gRPC code           |
|---------------------|---------------------|
| invalid_argument    | INVALID_ARGUMENT    |
| unauthenticated     | UNAUTHENTICATED     |
| permission_denied   | PERMISSION_DENIED   |
| resource_exhausted  | RESOURCE_EXHAUSTED (+ RetryInfo when retriable) |
| unavailable         | UNAVAILABLE         |
| deadline_exceeded   | DEADLINE_EXCEEDED   |
| internal / unknown  | INTERNAL, generic message (details only in the log) |
"""

from __future__ import annotations

import logging
from typing import cast

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from omnigate.errors import LimitExceeded, OmnigateError, Unavailable

log = logging.getLogger(__name__)

ERROR_DOMAIN = "omnigate.dev"

GRPC_CODES: dict[str, grpc.StatusCode] = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "internal": grpc.StatusCode.INTERNAL,
}

INTERNAL_MESSAGE = "internal error; the request was logged"


# A status travels in HTTP/2 trailers, which gRPC caps (8 KiB by default, for all metadata): a longer one
# reaches the caller as RESOURCE_EXHAUSTED "metadata size exceeds hard limit" instead of the refusal.
# Messages quote user input cut short (errors.quote); this is the backstop for any that forgot.
MAX_MESSAGE_CHARS = 1024


def bounded_message(message: str) -> str:
    """``message`` cut to MAX_MESSAGE_CHARS characters (and to valid UTF-8: trailers must carry it)."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 30] + f"... ({len(message)} characters)"


def to_status(exc: BaseException) -> grpc.Status:
    """Builds the gRPC status (with ErrorInfo and, when retriable, RetryInfo details) for an exception."""
    if isinstance(exc, OmnigateError) and exc.code in GRPC_CODES and exc.code != "internal":
        code = GRPC_CODES[exc.code]
        message = bounded_message(exc.message)
        reason = type(exc).__name__
    else:
        code = grpc.StatusCode.INTERNAL
        message = INTERNAL_MESSAGE
        reason = "INTERNAL"
    details = []
    info = error_details_pb2.ErrorInfo(reason=_reason_name(reason), domain=ERROR_DOMAIN)
    details.append(_pack(info))
    if isinstance(exc, LimitExceeded | Unavailable) and exc.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(exc.retry_after_s * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return rpc_status.to_status(proto)


def retry_after_s(error: grpc.RpcError) -> float | None:
    """The RetryInfo delay carried by a failed call's status, if any."""
    # from_call reads only trailing_metadata(), which sync calls and aio errors both have (an AioRpcError is
    # no grpc.Call, whose type the stubs ask for).
    status = rpc_status.from_call(cast(grpc.Call, error)) if hasattr(error, "trailing_metadata") else None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


async def abort(
    context: grpc.aio.ServicerContext, exc: BaseException, metadata: tuple[tuple[str, str], ...] = ()
) -> None:
    """Ends an RPC with the status for ``exc`` (logs unexpected errors with their traceback); ``metadata``
    goes in the trailers beside the status details (the request id: a client whose call was refused before
    it read the initial metadata still finds it there)."""
    if not isinstance(exc, OmnigateError) or exc.code == "internal":
        log.error("internal error", exc_info=exc)
    refusal = to_status(exc)
    if metadata:
        refusal = _Status(refusal.code, refusal.details, (*refusal.trailing_metadata, *metadata))
    await context.abort_with_status(refusal)


class _Status(grpc.Status):
    """A status with extra trailing metadata (grpc.Status is an interface with these three attributes)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _reason_name(reason: str) -> str:
    """ErrorInfo.reason is UPPER_SNAKE_CASE by convention."""
    out = []
    for i, ch in enumerate(reason):
        if ch.isupper() and i and (reason[i - 1].islower()):
            out.append("_")
        out.append(ch.upper())
    return "".join(out)


_KINDS_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidInput",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "LimitExceeded",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
}


# What grpcio's asyncio client reports when one of its own operations fails on a connection that broke
# under it (e.g. sending the request stream to a worker that was just killed): status INTERNAL from the
# local transport, not from the peer. A peer's INTERNAL carries its own message (INTERNAL_MESSAGE here).
_LOCAL_TRANSPORT_FAILURE = "Internal error from Core"


def is_connection_lost(error: grpc.RpcError) -> bool:
    """Whether a failed call broke on a lost connection (the peer went away) rather than being answered."""
    return error.code() is grpc.StatusCode.INTERNAL and (error.details() or "") == _LOCAL_TRANSPORT_FAILURE


def from_rpc_error(error: grpc.RpcError, *, upstream: str) -> OmnigateError:
    """A failed upstream call as a domain error, keeping its message and retry delay.

    Unexpected upstream codes become an internal error (logged, generic to the caller); an unreachable
    upstream is Unavailable, naming ``upstream``.
    """
    from omnigate import errors

    code = error.code()
    details = error.details() or ""
    if is_connection_lost(error):
        return errors.Unavailable(f"{upstream} went away mid-call (connection lost); retry shortly")
    if code is grpc.StatusCode.UNAVAILABLE and ("connect" in details.lower() or "socket" in details.lower()):
        return errors.Unavailable(f"{upstream} is unavailable ({details}); retry shortly")
    kind = _KINDS_BY_CODE.get(code)
    if kind is None:
        log.error("%s failed with %s: %s", upstream, code.name, details)
        return errors.InternalError(details)
    if kind == "LimitExceeded":
        return errors.LimitExceeded(details, retry_after_s=retry_after_s(error))
    if kind == "Unavailable":
        return errors.Unavailable(details, retry_after_s=retry_after_s(error))
    return getattr(errors, kind)(details)
