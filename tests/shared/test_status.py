"""Every domain error maps to one gRPC status, with google.rpc details, in one place."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from omnigate import errors, status
from omnigate_gateway.errors import ForbiddenSource, MediaDecodeError, MediaFetchError, MediaFetchTimeout

TABLE = [
    (errors.InvalidInput("bad"), grpc.StatusCode.INVALID_ARGUMENT, "bad"),
    (MediaDecodeError("could not decode wav"), grpc.StatusCode.INVALID_ARGUMENT, "could not decode wav"),
    (MediaFetchError("http://x/ answered 404"), grpc.StatusCode.INVALID_ARGUMENT, "http://x/ answered 404"),
    (errors.PermissionDenied("no"), grpc.StatusCode.PERMISSION_DENIED, "no"),
    (errors.Unauthenticated("who are you"), grpc.StatusCode.UNAUTHENTICATED, "who are you"),
    (ForbiddenSource("loopback refused"), grpc.StatusCode.PERMISSION_DENIED, "loopback refused"),
    (errors.LimitExceeded("too big"), grpc.StatusCode.RESOURCE_EXHAUSTED, "too big"),
    (errors.Unavailable("loading"), grpc.StatusCode.UNAVAILABLE, "loading"),
    (errors.DeadlineExceeded("slow"), grpc.StatusCode.DEADLINE_EXCEEDED, "slow"),
    (MediaFetchTimeout("fetch took too long"), grpc.StatusCode.DEADLINE_EXCEEDED, "fetch took too long"),
    (errors.InternalError("secret detail"), grpc.StatusCode.INTERNAL, status.INTERNAL_MESSAGE),
    (RuntimeError("secret detail"), grpc.StatusCode.INTERNAL, status.INTERNAL_MESSAGE),
]


def _details(s: grpc.Status) -> status_pb2.Status:
    ((key, value),) = s.trailing_metadata
    assert key == "grpc-status-details-bin"
    return status_pb2.Status.FromString(value)


@pytest.mark.parametrize("exc,code,message", TABLE, ids=[type(e).__name__ for e, _, _ in TABLE])
def test_mapping(exc, code, message):
    s = status.to_status(exc)
    assert s.code == code
    assert s.details == message
    details = _details(s)
    assert details.code == code.value[0] and details.message == message
    info = error_details_pb2.ErrorInfo()
    assert details.details[0].Unpack(info) and info.domain == status.ERROR_DOMAIN
    assert "secret" not in s.details


def test_retriable_limit_carries_retry_info():
    s = status.to_status(errors.LimitExceeded("queue full", retry_after_s=1.5))
    retry = error_details_pb2.RetryInfo()
    assert _details(s).details[1].Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() == 1_500_000_000


def test_unavailable_with_a_retry_delay_carries_retry_info():
    """No worker yet (a cold start): UNAVAILABLE tells the caller when to try again."""
    s = status.to_status(errors.Unavailable("no worker is ready", retry_after_s=30.0))
    assert s.code == grpc.StatusCode.UNAVAILABLE
    retry = error_details_pb2.RetryInfo()
    assert _details(s).details[1].Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() == 30_000_000_000
    assert len(_details(status.to_status(errors.Unavailable("draining"))).details) == 1  # no delay: none


class _FakeRpcError(grpc.RpcError):
    """A stand-in for a failed upstream call (control flow only)."""

    def __init__(self, code, details, trailing=()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


@pytest.mark.parametrize(
    "code,kind",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidInput),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.LimitExceeded),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.INTERNAL, errors.InternalError),
        (grpc.StatusCode.UNKNOWN, errors.InternalError),
    ],
)
def test_upstream_errors_keep_their_kind(code, kind):
    error = status.from_rpc_error(_FakeRpcError(code, "what went wrong"), upstream="the worker")
    assert type(error) is kind


def test_upstream_retry_delay_survives():
    s = status.to_status(errors.LimitExceeded("queue full", retry_after_s=2.0))
    error = status.from_rpc_error(
        _FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", s.trailing_metadata),
        upstream="the worker",
    )
    assert isinstance(error, errors.LimitExceeded) and error.retry_after_s == 2.0
    s = status.to_status(errors.Unavailable("no worker is ready", retry_after_s=30.0))
    error = status.from_rpc_error(
        _FakeRpcError(grpc.StatusCode.UNAVAILABLE, "no worker is ready", s.trailing_metadata),
        upstream="the gateway",
    )
    assert isinstance(error, errors.Unavailable) and error.retry_after_s == 30.0
    unreachable = status.from_rpc_error(
        _FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"),
        upstream="the worker",
    )
    assert "the worker is unavailable" in unreachable.message


def test_a_connection_lost_under_the_call_is_unavailable_not_internal():
    """grpcio's asyncio client fails a call whose connection broke (a killed worker) with a local INTERNAL
    "Internal error from Core"; a peer's own INTERNAL stays internal."""
    lost = _FakeRpcError(grpc.StatusCode.INTERNAL, "Internal error from Core")
    assert status.is_connection_lost(lost)
    error = status.from_rpc_error(lost, upstream="the worker at 127.0.0.1:1")
    assert isinstance(error, errors.Unavailable) and "connection lost" in error.message
    answered = _FakeRpcError(grpc.StatusCode.INTERNAL, status.INTERNAL_MESSAGE)
    assert not status.is_connection_lost(answered)
    assert isinstance(status.from_rpc_error(answered, upstream="the worker"), errors.InternalError)


def test_a_status_message_is_bounded_and_valid_utf8():
    """The backstop for a message that repeats oversized input: it stays under gRPC's trailer limit."""
    long = status.to_status(errors.InvalidInput("role " + "r" * 1_000_000 + " is not allowed"))
    assert len(long.details) <= status.MAX_MESSAGE_CHARS and long.details.endswith("characters)")
    odd = status.to_status(errors.InvalidInput("text \ud800 here"))
    assert odd.details == "text \\ud800 here"
