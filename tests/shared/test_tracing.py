"""omnigate.tracing and the structured logs: export configuration, propagation, request ids, log lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from omnigate import tracing
from omnigate.lifecycle import log_handler
from omnigate_gateway.core import request_id_from
from omnigate_gateway.settings import GatewaySettings
from omnigate_worker.settings import WorkerSettings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE_ID}-{SPAN_ID}-01"
SERVICE = "omnigate-test"  # never one of the services' names: other tests' providers stay untouched


@pytest.fixture
def service() -> Iterator[str]:
    yield SERVICE
    tracing.shutdown(SERVICE)


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver on an OS-chosen loopback port, keeping what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.received = threading.Event()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def Export(self, request, context):  # noqa: N802 - gRPC method name
        self.requests.append(request)
        self.received.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[str, str, str]]:
        """(service.name, span name, trace id) of every span received."""
        out = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        out.append((attributes.get("service.name"), span.name, span.trace_id.hex()))
        return out

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(None)


# ---- export configuration ------------------------------------------------------------------------------


def test_export_is_off_by_default(service):
    for settings in (GatewaySettings(), WorkerSettings()):
        assert settings.otlp_endpoint is None and settings.trace_sample_ratio == 1.0
    assert tracing.configure(service, otlp_endpoint=GatewaySettings().otlp_endpoint) is None
    assert tracing.provider(service) is None
    span = tracing.tracer(service).start_span("anything")
    assert not span.is_recording() and not span.get_span_context().is_valid
    assert tracing.inject(span) == []  # nothing to pass on without a caller's context


def test_context_passes_through_while_export_is_off(service):
    """With no provider, a caller's trace context still reaches the next service unchanged."""
    parent = tracing.extract([("traceparent", SAMPLED)])
    span = tracing.tracer(service).start_span("gateway.worker", context=parent)
    assert not span.is_recording()
    assert dict(tracing.inject(span))["traceparent"] == SAMPLED


def test_an_endpoint_exports_spans_over_otlp(service):
    with OtlpReceiver() as receiver:
        settings = GatewaySettings(otlp_endpoint=f"http://127.0.0.1:{receiver.port}")
        provider = tracing.configure(service, otlp_endpoint=settings.otlp_endpoint)
        assert provider is not None and tracing.provider(service) is provider
        with tracing.tracer(service).start_as_current_span("gateway.generate") as span:
            assert span.is_recording()
            trace_id = trace.format_trace_id(span.get_span_context().trace_id)
        assert provider.force_flush(10_000)
        assert receiver.received.wait(10)
        assert receiver.spans() == [(SERVICE, "gateway.generate", trace_id)]


def test_sampling_is_parent_based(service):
    """A ratio of 0 samples no new trace, but a caller's sampled trace is followed (and exported)."""
    with OtlpReceiver() as receiver:
        provider = tracing.configure(
            service, otlp_endpoint=f"http://127.0.0.1:{receiver.port}", sample_ratio=0.0
        )
        assert not tracing.tracer(service).start_span("new trace").is_recording()
        followed = tracing.tracer(service).start_span(
            "followed", context=tracing.extract({"traceparent": SAMPLED})
        )
        assert followed.is_recording()
        followed.end()
        assert provider.force_flush(10_000) and receiver.received.wait(10)
        assert receiver.spans() == [(SERVICE, "followed", TRACE_ID)]


def test_shutdown_exports_what_is_batched(service):
    with OtlpReceiver() as receiver:
        tracing.configure(service, otlp_endpoint=f"http://127.0.0.1:{receiver.port}")
        tracing.tracer(service).start_span("last words").end()
        tracing.shutdown(service)  # what main() does when the service stops
        assert [name for _, name, _ in receiver.spans()] == ["last words"]
    assert tracing.provider(service) is None and not tracing.tracer(service).start_span("x").is_recording()


@pytest.mark.parametrize("endpoint", ["collector:4317", "grpc://collector:4317", "http://"])
def test_an_endpoint_needs_a_scheme(endpoint, service):
    with pytest.raises(ValueError, match="otlp_endpoint"):
        GatewaySettings(otlp_endpoint=endpoint)
    with pytest.raises(ValueError, match="otlp_endpoint"):
        WorkerSettings(otlp_endpoint=endpoint)
    if "://" not in endpoint:
        with pytest.raises(ValueError, match="needs a scheme"):
            tracing.configure(service, otlp_endpoint=endpoint)


def test_settings_refuse_bad_ratios_and_formats():
    with pytest.raises(ValueError, match="trace_sample_ratio"):
        GatewaySettings(trace_sample_ratio=1.5)
    with pytest.raises(ValueError, match="log_format"):
        WorkerSettings(log_format="xml")
    assert GatewaySettings().log_format == WorkerSettings().log_format == "json"


# ---- request ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", "client-Req_42.a", "A" * 128, "0"])
def test_sane_request_ids_are_kept(value):
    assert tracing.sane_request_id(value) == value
    assert request_id_from(value) == value


@pytest.mark.parametrize(
    "value", [None, "", "A" * 129, "has space", "semi;colon", "new\nline", "ü", "{json}"]
)
def test_other_request_ids_are_replaced(value):
    assert tracing.sane_request_id(value) is None
    replaced = request_id_from(value)
    assert re.fullmatch(r"[0-9a-f]{32}", replaced) and replaced != request_id_from(value)


# ---- log lines -----------------------------------------------------------------------------------------


def _log(log_format: str, service: str, emit) -> list[str]:
    stream = io.StringIO()
    logger = logging.getLogger("omnigate_test.tracing")
    handler = log_handler(log_format, service, stream)
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    return stream.getvalue().splitlines()


def test_json_lines_carry_the_request_context():
    def emit(logger):
        logger.info("outside")
        parent = tracing.extract({"traceparent": SAMPLED})
        with tracing.activate(request_id="req-1", context=parent):
            logger.info("inside %s", "a request", extra={"mode": "text", "output_tokens": 3})
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                logger.exception("failed")

    outside, inside, failed = (json.loads(line) for line in _log("json", "omnigate-gateway", emit))
    assert list(outside) == ["time", "level", "logger", "message", "service"]
    assert outside["service"] == "omnigate-gateway" and outside["level"] == "INFO"
    assert outside["logger"] == "omnigate_test.tracing" and outside["message"] == "outside"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", outside["time"])
    assert list(inside)[:8] == [
        "time",
        "level",
        "logger",
        "message",
        "service",
        "request_id",
        "trace_id",
        "span_id",
    ]
    assert inside["message"] == "inside a request"
    assert (inside["request_id"], inside["trace_id"], inside["span_id"]) == ("req-1", TRACE_ID, SPAN_ID)
    assert inside["mode"] == "text" and inside["output_tokens"] == 3
    assert failed["level"] == "ERROR" and "RuntimeError: boom" in failed["exc_info"]
    assert failed["request_id"] == "req-1"


def test_text_lines_name_the_request():
    def emit(logger):
        with tracing.activate(request_id="req-2"):
            logger.warning("slow")
        logger.warning("idle")

    slow, idle = _log("text", "omnigate-worker", emit)
    assert slow.endswith("WARNING omnigate_test.tracing: slow [request_id=req-2]")
    assert idle.endswith("WARNING omnigate_test.tracing: idle")


def test_unknown_log_format_is_refused():
    with pytest.raises(ValueError, match="log format 'xml'"):
        log_handler("xml")


def test_a_request_context_on_another_thread():
    """The worker's threads activate a request's captured context: their logs and spans join it."""
    parent = tracing.extract({"traceparent": SAMPLED})
    with tracing.activate(request_id="req-3", context=parent):
        captured = tracing.current_context(), tracing.current_request_id()
    seen = {}

    def work():
        seen["before"] = tracing.current_request_id()
        with tracing.activate(context=captured[0], request_id=captured[1]):
            span_context = trace.get_current_span().get_span_context()
            seen["inside"] = (tracing.current_request_id(), trace.format_trace_id(span_context.trace_id))
        seen["after"] = tracing.current_request_id()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == {"before": None, "inside": ("req-3", TRACE_ID), "after": None}


async def test_activate_in_a_generator_closed_from_another_task(caplog):
    """An async generator finalized in another context leaves its values there instead of failing."""
    errors = []
    caplog.set_level(logging.DEBUG)

    async def events():
        with tracing.activate(request_id="req-4", context=tracing.extract({"traceparent": SAMPLED})):
            yield 1
            yield 2

    generator = events()
    assert await generator.__anext__() == 1
    assert tracing.current_request_id() == "req-4"  # bound in this task's context while it runs

    async def close_elsewhere():
        try:
            await generator.aclose()
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    await asyncio.create_task(close_elsewhere())
    assert errors == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
