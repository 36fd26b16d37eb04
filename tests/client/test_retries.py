"""Retries, deadlines and metadata of the sync and async clients, against a FAKE gateway (control flow).

The fake is a real gRPC server on a loopback port; it fails N times then succeeds, fails after output
started, or stalls, as each test scripts it.
"""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest

from omnigate_client import (
    AsyncOmnigateClient,
    OmnigateClient,
    OmnigateClientError,
    RetryPolicy,
    Summary,
    TextDelta,
)
from tests.support.fake_gateway import FakeGateway, FakeGatewayServer, Step

HELLO = [{"role": "user", "content": "hi"}]
FAST = RetryPolicy(max_retries=3, initial_backoff_s=0.05, max_backoff_s=0.2)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def _serve(*steps: Step, request_id: str | None = "fake-request-1") -> FakeGatewayServer:
    return FakeGatewayServer(FakeGateway(steps=list(steps), request_id=request_id))


def _gaps(fake: FakeGateway) -> list[float]:
    return [b.at - a.at for a, b in zip(fake.calls, fake.calls[1:], strict=False)]


# ------------------------------------------------------------------------------------------------------
# sync
# ------------------------------------------------------------------------------------------------------


def test_unavailable_is_retried_with_growing_backoff_then_succeeds():
    failing = Step(code=UNAVAILABLE, texts=())
    with _serve(failing, failing, failing) as server:
        with OmnigateClient(server.target, retry_policy=FAST) as client:
            stream = client.generate(HELLO)
            result = stream.collect()
    assert result.text == "Hello world" and result.finish_reason == "stop"
    assert stream.attempts == 4 and len(server.fake.calls) == 4
    gaps = _gaps(server.fake)
    # backoff 0.05, 0.1, 0.2 s with 50 % jitter: each wait at least half its base
    assert gaps[0] >= 0.025 and gaps[1] >= 0.05 and gaps[2] >= 0.1
    assert max(gaps) < 3.0


def test_resource_exhausted_with_retry_info_waits_the_servers_delay():
    with _serve(Step(code=EXHAUSTED, message="queue full", retry_after_s=0.4, texts=())) as server:
        with OmnigateClient(server.target, retry_policy=FAST) as client:
            result = client.generate_all(HELLO)
    assert result.text == "Hello world"
    assert len(server.fake.calls) == 2
    assert _gaps(server.fake)[0] >= 0.4, "RetryInfo's delay is honoured"


def test_unavailable_with_retry_info_waits_the_cold_start_delay_not_the_backoff():
    """No worker yet (scaled to zero): the gateway's UNAVAILABLE carries a delay sized to a cold start,
    longer than any backoff; the client waits it (within the deadline) instead of giving up in a second."""
    cold = Step(code=UNAVAILABLE, message="no worker is ready", retry_after_s=1.0, texts=())
    with _serve(cold) as server:
        with OmnigateClient(server.target, retry_policy=FAST, timeout_s=10) as client:
            result = client.generate_all(HELLO)
    assert result.text == "Hello world" and len(server.fake.calls) == 2
    assert _gaps(server.fake)[0] >= 1.0 > FAST.max_backoff_s
    # The gateway's default delay (OMNIGATE_GATEWAY_NO_WORKER_RETRY_AFTER_S, 30 s) is honoured by default.
    error = OmnigateClientError(UNAVAILABLE, "no worker is ready", retry_after=30.0)
    assert RetryPolicy().delay(error, 1) >= 30.0  # type: ignore[operator]


@pytest.mark.parametrize(
    "step",
    [
        Step(code=EXHAUSTED, message="audio is 700 s long; the limit is 600 s", texts=()),  # no RetryInfo
        Step(code=grpc.StatusCode.INVALID_ARGUMENT, message="bad", texts=()),
        Step(code=grpc.StatusCode.PERMISSION_DENIED, message="no", texts=()),
        Step(code=grpc.StatusCode.INTERNAL, message="oops", texts=()),
    ],
    ids=["exhausted-without-retry-info", "invalid-argument", "permission-denied", "internal"],
)
def test_non_retriable_errors_are_raised_at_once(step):
    with _serve(step) as server:
        with OmnigateClient(server.target, retry_policy=FAST) as client:
            with pytest.raises(OmnigateClientError) as err:
                client.generate_all(HELLO)
    assert len(server.fake.calls) == 1
    error = err.value
    assert error.code() == step.code and error.message == step.message
    assert error.retry_after is None and error.attempts == 1
    assert error.reason == "FAKE_REASON" and error.domain == "omnigate.dev"
    assert error.request_id == "fake-request-1"
    assert isinstance(error, grpc.RpcError) and error.details() == step.message  # grpc-compatible


def test_no_retry_once_output_started():
    with _serve(Step(code=UNAVAILABLE, message="worker went away", texts=("partial",))) as server:
        with OmnigateClient(server.target, retry_policy=FAST) as client:
            received = []
            with pytest.raises(OmnigateClientError) as err:
                for event in client.generate(HELLO):
                    received.append(event)
    assert received == [TextDelta("partial")], "the event before the failure was delivered"
    assert err.value.code() == UNAVAILABLE and err.value.attempts == 1
    assert len(server.fake.calls) == 1, "a stream that started is never repeated"


# How far over the requested deadline the server may see it (gRPC rounds the wire timeout up).
WIRE_TIMEOUT_ROUNDING_S = 0.05


def test_attempts_are_bounded():
    with _serve(*[Step(code=UNAVAILABLE, texts=())] * 10) as server:
        with OmnigateClient(
            server.target, retry_policy=RetryPolicy(max_retries=2, initial_backoff_s=0.01)
        ) as client:
            with pytest.raises(OmnigateClientError) as err:
                client.generate_all(HELLO)
            assert err.value.attempts == 3 and len(server.fake.calls) == 3
            with pytest.raises(OmnigateClientError):
                client.generate_all(HELLO, retries=0)  # per call: no retry
            assert len(server.fake.calls) == 4


def test_deadline_is_sent_and_respected():
    with _serve(Step(delay_before_s=10)) as server:
        with OmnigateClient(server.target, timeout_s=30) as client:
            started = time.monotonic()
            with pytest.raises(OmnigateClientError) as err:
                client.generate_all(HELLO, timeout_s=0.5)
            elapsed = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 3.0
    # gRPC sends the timeout in a lossy header format that rounds up (a CI run saw 0.5005 s on the
    # server), so the check allows a little over 0.5 s: what matters is that the per-call 0.5 s, not
    # the client's 30 s default, reached the server.
    assert 0 < server.fake.calls[0].deadline_s <= 0.5 + WIRE_TIMEOUT_ROUNDING_S, (
        "the per-call deadline reached the server"
    )


def test_client_default_deadline_applies():
    with _serve(Step(delay_before_s=10)) as server:
        with OmnigateClient(server.target, timeout_s=0.4) as client:
            with pytest.raises(OmnigateClientError) as err:
                client.generate_all(HELLO)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_retry_that_would_outlive_the_deadline_is_not_attempted():
    with _serve(Step(code=EXHAUSTED, retry_after_s=30, texts=())) as server:
        with OmnigateClient(server.target, retry_policy=FAST) as client:
            started = time.monotonic()
            with pytest.raises(OmnigateClientError) as err:
                client.generate_all(HELLO, timeout_s=2)
    assert time.monotonic() - started < 1.5, "no 30 s wait inside a 2 s deadline"
    assert err.value.retry_after == pytest.approx(30) and len(server.fake.calls) == 1


def test_api_key_metadata_and_request_id():
    with _serve() as server:
        with OmnigateClient(server.target, api_key="k-123", metadata={"x-tenant": "blue"}) as client:
            stream = client.generate(HELLO, request_id="mine-1")
            events = list(stream)
            info = client.model_info()
    call = server.fake.calls[0]
    assert call.metadata["authorization"] == "Bearer k-123"
    assert call.metadata["x-tenant"] == "blue" and call.metadata["x-request-id"] == "mine-1"
    assert server.fake.calls[1].metadata["authorization"] == "Bearer k-123"
    assert stream.request_id == "fake-request-1"
    assert isinstance(events[-1], Summary) and events[-1].usage.total_tokens == 5
    assert info.model_id == "fake" and info["input_modalities"] == ["text"]


def test_model_info_is_retried():
    with _serve(Step(code=UNAVAILABLE, texts=())) as server:
        with OmnigateClient(server.target, retry_policy=FAST) as client:
            assert client.model_info().model_id == "fake"
    assert len(server.fake.calls) == 2


def test_closing_a_stream_early_cancels_the_call():
    with _serve(Step(texts=tuple(f"t{i}" for i in range(100)), delay_between_s=0.05)) as server:
        with OmnigateClient(server.target) as client:
            stream = client.generate(HELLO)
            assert next(stream) == TextDelta("t0")
            stream.close()
            with pytest.raises(StopIteration):
                next(stream)
            deadline = time.monotonic() + 3
            while not server.fake.cancelled_calls and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server.fake.cancelled_calls == 1, "the gateway saw the call end"
            assert client.generate_all(HELLO).text == "Hello world"  # the channel still works


def test_unreachable_gateway_is_unavailable_after_bounded_retries():
    with socket.socket() as sock:  # a loopback port nothing listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
    with OmnigateClient(target, retry_policy=RetryPolicy(max_retries=2, initial_backoff_s=0.01)) as client:
        started = time.monotonic()
        with pytest.raises(OmnigateClientError) as err:
            client.generate_all(HELLO, timeout_s=20)
    assert err.value.code() == UNAVAILABLE and err.value.attempts == 3
    assert time.monotonic() - started < 15


# ------------------------------------------------------------------------------------------------------
# async
# ------------------------------------------------------------------------------------------------------


async def test_async_retries_then_streams():
    failing = Step(code=UNAVAILABLE, texts=())
    with _serve(failing, Step(code=EXHAUSTED, retry_after_s=0.3, texts=())) as server:
        async with AsyncOmnigateClient(server.target, retry_policy=FAST, api_key="k-9") as client:
            stream = client.generate(HELLO)
            events = [event async for event in stream]
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hello", " world"]
    assert stream.attempts == 3 and stream.request_id == "fake-request-1"
    assert _gaps(server.fake)[1] >= 0.3
    assert all(c.metadata["authorization"] == "Bearer k-9" for c in server.fake.calls)


async def test_async_no_retry_once_output_started():
    with _serve(Step(code=UNAVAILABLE, texts=("partial",))) as server:
        async with AsyncOmnigateClient(server.target, retry_policy=FAST) as client:
            received = []
            with pytest.raises(OmnigateClientError) as err:
                async for event in client.generate(HELLO):
                    received.append(event)
    assert received == [TextDelta("partial")] and len(server.fake.calls) == 1
    assert err.value.code() == UNAVAILABLE and err.value.request_id == "fake-request-1"


async def test_async_deadline_and_non_retriable():
    with _serve(Step(delay_before_s=10), Step(code=grpc.StatusCode.INVALID_ARGUMENT, texts=())) as server:
        async with AsyncOmnigateClient(server.target, retry_policy=FAST) as client:
            started = time.monotonic()
            with pytest.raises(OmnigateClientError) as err:
                await client.generate_all(HELLO, timeout_s=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 3.0
            with pytest.raises(OmnigateClientError) as err:
                await client.generate_all(HELLO)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(server.fake.calls) == 2


async def test_async_model_info_health_and_bounded_attempts():
    with _serve(*[Step(code=UNAVAILABLE, texts=())] * 5) as server:
        policy = RetryPolicy(max_retries=1, initial_backoff_s=0.01)
        async with AsyncOmnigateClient(server.target, retry_policy=policy) as client:
            assert await client.health() == "SERVING"
            with pytest.raises(OmnigateClientError) as err:
                await client.model_info()
            assert err.value.attempts == 2
            results = await asyncio.gather(*(client.generate_all(HELLO, retries=3) for _ in range(3)))
    assert all(r.text == "Hello world" for r in results)
