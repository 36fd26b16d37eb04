"""Tracing (OpenTelemetry) and request correlation, for both services.

- **Providers.** ``configure(service, ...)`` sets up one ``TracerProvider`` per service (resource
  ``service.name`` = ``omnigate-gateway`` / ``omnigate-worker``), kept here and looked up by name with
  ``tracer(service)``, so a gateway and a worker can share one process (tests) and nothing depends on
  OpenTelemetry's process-wide global provider. Tracing is off by default: without an OTLP endpoint (or a
  test exporter) no SDK provider exists, spans are non-recording and cost next to nothing, and a caller's
  W3C trace context still passes through the gateway to the worker.
- **Export.** OTLP over gRPC with a ``BatchSpanProcessor`` when ``otlp_endpoint`` is set
  (``http://host:4317`` plaintext, ``https://`` TLS). Sampling is parent-based: a trace a caller sampled
  (or not) is followed, new traces are sampled at ``sample_ratio``. The standard OpenTelemetry variables
  refine what the settings do not say: ``OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`` / ``_CERTIFICATE`` /
  ``_TIMEOUT`` / ``_COMPRESSION``, ``OTEL_BSP_*`` and ``OTEL_RESOURCE_ATTRIBUTES``; exporting itself is only
  switched on by the Omnigate setting (``OTEL_EXPORTER_OTLP_ENDPOINT`` alone does not turn it on).
- **Propagation.** ``inject`` / ``extract`` put W3C ``traceparent`` / ``tracestate`` into and read them
  from gRPC metadata.
- **Correlation.** The request id and the current span live in contextvars (``activate``); the
  ``LogContextFilter`` adds ``request_id``, ``trace_id`` and ``span_id`` to every log record made while they
  are set, on whatever thread (the worker's engine and preprocessing threads activate a request's context
  explicitly, see ``scheduler.Job``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

GATEWAY = "omnigate-gateway"
WORKER = "omnigate-worker"
INSTRUMENTATION_NAME = "omnigate"

REQUEST_ID_METADATA = "x-request-id"
MAX_REQUEST_ID_LENGTH = 128
_SANE_REQUEST_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_REQUEST_ID_LENGTH}}}")

# gRPC codes that are the server's fault (OpenTelemetry's gRPC conventions): only these mark a server span
# as an error; a client's bad input is not a failure of the service.
SERVER_ERROR_CODES = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)

_PROPAGATOR = TraceContextTextMapPropagator()
_NOOP_TRACER = trace.NoOpTracer()
_providers: dict[str, TracerProvider] = {}
_tracers: dict[str, trace.Tracer] = {}
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("omnigate_request_id", default=None)

__all__ = [
    "GATEWAY",
    "WORKER",
    "REQUEST_ID_METADATA",
    "SpanKind",
    "LogContextFilter",
    "activate",
    "configure",
    "current_context",
    "current_request_id",
    "end_span",
    "extract",
    "inject",
    "record_span",
    "sane_request_id",
    "set_grpc_code",
    "shutdown",
    "tracer",
    "wall_ns",
]


# ---- providers ---------------------------------------------------------------------------------------


def configure(
    service: str,
    *,
    otlp_endpoint: str | None = None,
    sample_ratio: float = 1.0,
    exporter: SpanExporter | None = None,
) -> TracerProvider | None:
    """Sets up ``service``'s tracing; returns its provider, or None when tracing stays off.

    ``otlp_endpoint`` turns on OTLP/gRPC export (batched). ``exporter`` adds any span exporter, exporting
    each span as it ends (tests pass an ``InMemorySpanExporter``). A provider configured earlier for the
    same service is shut down and replaced.
    """
    if not 0.0 <= sample_ratio <= 1.0:
        raise ValueError(f"the trace sample ratio is {sample_ratio}; it must be between 0 and 1")
    shutdown(service)
    if not otlp_endpoint and exporter is None:
        return None
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: service}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    if otlp_endpoint:
        if not otlp_endpoint.startswith(("http://", "https://")):
            raise ValueError(
                f"the OTLP endpoint {otlp_endpoint!r} needs a scheme: http://host:4317 (plaintext) or "
                "https://host:4317 (TLS)"
            )
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
        logging.getLogger(__name__).info(
            "%s: exporting traces to %s (sample ratio %g)", service, otlp_endpoint, sample_ratio
        )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    _providers[service] = provider
    _tracers[service] = provider.get_tracer(INSTRUMENTATION_NAME)
    return provider


def shutdown(service: str) -> None:
    """Flushes and stops ``service``'s provider (exports what is still batched); tracing is off after."""
    _tracers.pop(service, None)
    provider = _providers.pop(service, None)
    if provider is not None:
        provider.shutdown()


def provider(service: str) -> TracerProvider | None:
    """The service's provider, None while tracing is off."""
    return _providers.get(service)


def tracer(service: str) -> trace.Tracer:
    """The service's tracer (a no-op one, which still carries a caller's context, while tracing is off)."""
    return _tracers.get(service, _NOOP_TRACER)


# ---- propagation -------------------------------------------------------------------------------------


def extract(metadata: Iterable[tuple[str, str | bytes]] | Mapping[str, str] | None) -> otel_context.Context:
    """The trace context a caller sent in gRPC metadata (``traceparent``), as a parent for a new span."""
    if metadata is None:
        carrier: dict[str, str] = {}
    elif isinstance(metadata, Mapping):
        carrier = {str(k).lower(): v for k, v in metadata.items() if isinstance(v, str)}
    else:
        carrier = {str(k).lower(): v for k, v in metadata if isinstance(v, str)}
    return _PROPAGATOR.extract(carrier)


def inject(span: trace.Span | None = None) -> list[tuple[str, str]]:
    """gRPC metadata carrying ``span`` (default: the current span) to the next service."""
    carrier: dict[str, str] = {}
    ctx = trace.set_span_in_context(span) if span is not None else None
    _PROPAGATOR.inject(carrier, context=ctx)
    return list(carrier.items())


# ---- request ids and the current request's context ----------------------------------------------------


def sane_request_id(value: str | None) -> str | None:
    """``value`` when it is a usable request id (1-128 characters of ``[A-Za-z0-9._-]``), else None."""
    if value and _SANE_REQUEST_ID.fullmatch(value):
        return value
    return None


def current_request_id() -> str | None:
    return _request_id.get()


def current_context() -> otel_context.Context:
    """The current trace context, to carry to another thread (``activate(context=...)`` there)."""
    return otel_context.get_current()


@contextlib.contextmanager
def activate(
    span: trace.Span | None = None,
    *,
    request_id: str | None = None,
    context: otel_context.Context | None = None,
) -> Iterator[None]:
    """Makes ``span`` (or a whole trace ``context``) current and binds ``request_id``, for logs and child spans.

    Safe around ``await`` and ``yield``: when an async generator is finalized from another context than
    the one it started in, the values are left to that context (which is about to go away) instead of
    failing to reset.
    """
    if span is not None:
        context = trace.set_span_in_context(span, context)
    otel_token = otel_context.attach(context) if context is not None else None
    id_token = _request_id.set(request_id) if request_id is not None else None
    try:
        yield
    finally:
        if id_token is not None:
            with contextlib.suppress(ValueError):  # finalized in another context
                _request_id.reset(id_token)
        if otel_token is not None:
            _detach(otel_token)


def _detach(token: contextvars.Token[otel_context.Context]) -> None:
    """``opentelemetry.context.detach``, quiet when the token belongs to another context (its runtime
    context is contextvars-based: a token there is a ``contextvars.Token``)."""
    var = getattr(token, "var", None)
    if isinstance(var, contextvars.ContextVar):
        with contextlib.suppress(ValueError, RuntimeError):
            var.reset(token)
    else:
        otel_context.detach(token)


# ---- spans -------------------------------------------------------------------------------------------


def wall_ns(monotonic_s: float | None = None) -> int:
    """A ``time.monotonic()`` reading as nanoseconds since the epoch (span timestamps); now when None."""
    if monotonic_s is None:
        return time.time_ns()
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def set_grpc_code(span: trace.Span, code: str, *, client: bool = False) -> None:
    """Records a call's gRPC status code on its span; marks the span as an error where the code is one.

    Client spans: every code but OK. Server spans: only the server's own failures (``SERVER_ERROR_CODES``).
    """
    if not span.is_recording():
        return
    span.set_attribute("rpc.grpc.status_code", code)
    if code != "OK" and (client or code in SERVER_ERROR_CODES):
        span.set_status(Status(StatusCode.ERROR, code))


def end_span(span: trace.Span, code: str = "OK", *, client: bool = False) -> None:
    """Ends a server (or client) span with its call's gRPC status code."""
    set_grpc_code(span, code, client=client)
    span.end()


def record_span(
    service: str,
    name: str,
    parent: otel_context.Context | None,
    start_monotonic_s: float,
    end_monotonic_s: float,
    attributes: Mapping[str, str | int | float | bool] | None = None,
    error: BaseException | None = None,
) -> trace.Span:
    """Records a span that already happened (explicit start and end), under ``parent``.

    For work that is not one block of code on one thread: time in a queue, or one request's share of a
    decode loop that many requests run together.
    """
    span = tracer(service).start_span(
        name, context=parent, start_time=wall_ns(start_monotonic_s), attributes=attributes
    )
    if error is not None and span.is_recording():
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end(end_time=wall_ns(end_monotonic_s))
    return span


# ---- logs --------------------------------------------------------------------------------------------


class LogContextFilter(logging.Filter):
    """Adds ``request_id``, ``trace_id`` and ``span_id`` to a record when the current context has them."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _request_id.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid and not hasattr(record, "trace_id"):
            record.trace_id = trace.format_trace_id(span_context.trace_id)
            record.span_id = trace.format_span_id(span_context.span_id)
        return True
