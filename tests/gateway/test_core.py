"""The gateway core (``core.GatewayCore``) on its own: the one request path both front doors share, with its
observation (``observation.py``: metrics, access line), against a fake worker pool named as one (these tests
are about the core's control flow; the real pool has tests/gateway/test_pool.py and the real stack
tests/integration/)."""

from __future__ import annotations

import contextlib
import logging

import grpc
import pytest
from prometheus_client import CollectorRegistry

from omnigate import status
from omnigate.errors import InternalError, InvalidInput, Unavailable
from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate.grpc_server import Undecodable
from omnigate_gateway.core import Call, GatewayCore
from omnigate_gateway.settings import GatewaySettings
from tests.support.fake_workers import TEXT_MODEL, FakeWorkerPool, core_over, rpc_error, text


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def pool() -> FakeWorkerPool:
    return FakeWorkerPool()


@pytest.fixture
def core(registry, pool) -> GatewayCore:
    return core_over(pool, registry)


def _request(text: str = "Say hello.", **fields) -> gw.GenerateRequest:
    return gw.GenerateRequest(
        messages=[gw.Message(role="user", content=[gw.ContentPart(text=text)])],
        generation_mode=fields.pop("generation_mode", gw.GENERATION_MODE_TEXT),
        **fields,
    )


def _value(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def _collect(core: GatewayCore, request, call: Call | None = None) -> list[gw.GenerateResponse]:
    return [event async for event in core.generate(request, call or Call(rpc="Generate"))]


async def test_a_request_streams_the_workers_events_and_is_counted_once(core, pool, registry, caplog):
    call = Call(rpc="Generate", request_id="req-core-1")
    with caplog.at_level(logging.INFO, logger="omnigate_gateway.access"):
        events = await _collect(core, _request(), call)

    assert [e.text.text for e in events if e.HasField("text")] == ["Hel", "lo"]
    summary = events[-1].summary
    assert summary.output_tokens == 2 and summary.model_id == "fake/text-model"
    assert summary.finish_reason == gw.FINISH_REASON_LENGTH
    assert summary.timings.total_s > 0
    sent, timeout, metadata = pool.calls[0]
    assert sent.request_id == "req-core-1" and ("x-request-id", "req-core-1") in metadata
    assert 0 < timeout <= core.settings.default_timeout_s
    assert pool.started[0].cancelled  # the finished call is released (a no-op on a real finished call)
    assert _value(registry, "omnigate_gateway_requests_total", rpc="Generate", code="OK", mode="text") == 1
    assert _value(registry, "omnigate_gateway_generated_tokens_total") == 2
    assert _value(registry, "omnigate_gateway_time_to_first_token_seconds_count", mode="text") == 1
    assert _value(registry, "omnigate_gateway_requests_in_flight") == 0
    [line] = [r for r in caplog.records if r.name == "omnigate_gateway.access"]
    assert (line.rpc, line.code, line.mode, line.output_tokens) == ("Generate", "OK", "text", 2)


@pytest.mark.parametrize(
    ("request_", "info", "message"),
    [
        (_request(parameters=gw.GenerationParameters(max_new_tokens=513)), TEXT_MODEL, "between 1 and 512"),
        (_request(generation_mode=gw.GENERATION_MODE_AUDIO), TEXT_MODEL, "cannot generate audio"),
        (_request(generation_mode=gw.GENERATION_MODE_UNSPECIFIED), TEXT_MODEL, "generation_mode is not set"),
        (Undecodable("GenerateRequest", ValueError("truncated")), TEXT_MODEL, "not a valid GenerateRequest"),
    ],
    ids=["over-the-models-token-limit", "a-mode-the-model-lacks", "no-mode", "undecodable"],
)
async def test_a_refused_request_never_reaches_a_worker_and_is_counted_as_rejected(
    core, pool, registry, request_, info, message
):
    pool.info = info
    with pytest.raises(InvalidInput, match=message):
        await _collect(core, request_)
    assert pool.calls == []
    assert _value(registry, "omnigate_gateway_rejected_requests_total", reason="invalid_argument") == 1
    code = {"code": "INVALID_ARGUMENT"}
    assert sum(_value(registry, "omnigate_gateway_requests_total", rpc="Generate", mode=m, **code) for m in
               ("text", "audio", "image", "unknown")) == 1  # fmt: skip


async def test_no_ready_worker_is_unavailable_and_counted_as_no_worker(core, pool, registry):
    pool.info = None
    with pytest.raises(Unavailable) as refused:
        await _collect(core, _request())
    assert refused.value.retry_after_s == core.settings.no_worker_retry_after_s  # sized to a cold start
    assert _value(registry, "omnigate_gateway_admitted_requests") == 0  # demand only while it lasted
    assert _value(registry, "omnigate_gateway_rejected_requests_total", reason="no_worker") == 1
    assert (
        _value(registry, "omnigate_gateway_requests_total", rpc="Generate", code="UNAVAILABLE", mode="text")
        == 1
    )


async def test_a_worker_failure_mid_stream_names_the_worker_and_counts_an_upstream_error(
    core, pool, registry
):
    pool.events = [text("Hel"), rpc_error(grpc.StatusCode.UNAVAILABLE, "socket closed")]
    received = []
    with pytest.raises(Unavailable, match="fake-worker:50061"):
        async for event in core.generate(_request(), Call(rpc="Generate")):
            received.append(event)
    assert len(received) == 1  # what was streamed before the failure reached the caller
    assert _value(registry, "omnigate_gateway_upstream_errors_total", code="UNAVAILABLE") == 1
    assert (
        _value(registry, "omnigate_gateway_rejected_requests_total", reason="no_worker") == 0
    )  # it was admitted
    assert (
        _value(registry, "omnigate_gateway_requests_total", rpc="Generate", code="UNAVAILABLE", mode="text")
        == 1
    )


async def test_an_unexpected_worker_code_is_internal_to_the_caller(core, pool, registry, caplog):
    pool.events = [rpc_error(grpc.StatusCode.DATA_LOSS, "worker internals the caller must not see")]
    with (
        caplog.at_level(logging.INFO, logger="omnigate_gateway.access"),
        pytest.raises(InternalError) as raised,
    ):
        await _collect(core, _request())
    refusal = status.to_status(raised.value)
    assert refusal.code is grpc.StatusCode.INTERNAL and "internals" not in refusal.details
    [line] = [r for r in caplog.records if r.name == "omnigate_gateway.access"]
    assert line.code == "INTERNAL" and "internals" not in line.getMessage()
    assert _value(registry, "omnigate_gateway_upstream_errors_total", code="DATA_LOSS") == 1


async def test_a_caller_that_leaves_mid_stream_cancels_the_worker_call(core, pool, registry):
    events = core.generate(_request(), Call(rpc="Generate"))
    first = await anext(events)
    assert first.text.text == "Hel"
    await events.aclose()
    assert pool.started[0].cancelled and pool.started[0].read == 1
    assert (
        _value(registry, "omnigate_gateway_requests_total", rpc="Generate", code="CANCELLED", mode="text")
        == 1
    )
    assert _value(registry, "omnigate_gateway_requests_in_flight") == 0


async def test_a_caller_whose_deadline_passed_is_counted_as_deadline_exceeded(core, pool, registry):
    events = core.generate(_request(), Call(rpc="Generate", time_remaining_s=0.05))
    await anext(events)
    await events.aclose()  # the caller's deadline (0.05 s, less the slack) has passed: not a plain cancel
    assert (
        _value(
            registry, "omnigate_gateway_requests_total", rpc="Generate", code="DEADLINE_EXCEEDED", mode="text"
        )
        == 1
    )


async def test_model_info_is_counted_and_logged_like_generate(core, pool, registry, caplog):
    with caplog.at_level(logging.INFO, logger="omnigate_gateway.access"):
        info = core.public_model_info(Call(rpc="GetModelInfo"))
        pool.info = None
        with contextlib.suppress(Unavailable):
            core.public_model_info(Call(rpc="GetModelInfo"))
    assert info.model_id == "fake/text-model" and info.limits.max_new_tokens == 512
    assert (
        _value(registry, "omnigate_gateway_requests_total", rpc="GetModelInfo", code="OK", mode="none") == 1
    )
    assert (
        _value(
            registry, "omnigate_gateway_requests_total", rpc="GetModelInfo", code="UNAVAILABLE", mode="none"
        )
        == 1
    )
    codes = [r.code for r in caplog.records if r.name == "omnigate_gateway.access"]
    assert codes == ["OK", "UNAVAILABLE"]


async def test_admitted_demand_counts_requests_past_validation_only(core, pool, registry):
    """omnigate_gateway_admitted_requests (the scale-from-zero signal) counts a request from the end of
    its validation to its end; one refused before never counts."""
    seen = []
    stream = core.generate(_request(), Call(rpc="Generate"))
    async for _ in stream:
        seen.append(_value(registry, "omnigate_gateway_admitted_requests"))
    assert seen and set(seen) == {1}
    assert _value(registry, "omnigate_gateway_admitted_requests") == 0
    with pytest.raises(InvalidInput):
        await _collect(core, gw.GenerateRequest(generation_mode=gw.GENERATION_MODE_TEXT))
    assert _value(registry, "omnigate_gateway_admitted_requests") == 0


async def test_the_wait_for_a_worker_never_runs_past_the_callers_deadline(registry, pool):
    """The core asks the pool to wait at most wait_for_worker_s, and less when the caller's deadline is
    nearer (leaving it time to get the refusal)."""
    waits = []

    async def wait_for_info(timeout_s: float, retry_after_s: float):  # type: ignore[no-untyped-def]
        waits.append((timeout_s, retry_after_s))
        raise Unavailable("no worker is ready (fake pool)", retry_after_s=retry_after_s)

    pool.wait_for_info = wait_for_info  # type: ignore[method-assign]
    settings = GatewaySettings(wait_for_worker_s=100, no_worker_retry_after_s=12)
    core = core_over(pool, registry, settings)
    for remaining in (None, 5.0, 0.2):
        with pytest.raises(Unavailable):
            await _collect(core, _request(), Call(rpc="Generate", time_remaining_s=remaining))
    (long, _), (short, retry), (none, _) = waits
    assert long == pytest.approx(100, abs=0.5) and retry == 12
    assert 4 < short < 5
    assert none == 0
