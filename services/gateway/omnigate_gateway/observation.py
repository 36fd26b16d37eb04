"""Everything observed about one gateway call, in one place: metrics, spans, the access line.

The request path (``core.GatewayCore``) says how far a request got (``admitted``, ``parsed``,
``calling_worker``), hands over each event as it streams, and reports how it ended; this records the rest.
The metrics are the contract in docs/metrics.md; every front door's calls are observed here, so a request
is counted and logged the same whatever door it came through.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Self

import grpc

from omnigate import status, tracing
from omnigate.enums import PUBLIC_MODES
from omnigate.gateway.v1 import gateway_pb2
from omnigate.grpc_server import Undecodable
from omnigate_gateway.metrics import GatewayMetrics

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from omnigate_gateway.core import Call

access_log = logging.getLogger("omnigate_gateway.access")
REASON_CHARS = 300  # of a refusal's message in its access line
DEADLINE_SLACK_S = 0.1  # the caller's deadline timer starts a little before ours


class CallObservation:
    """One call's span (continuing the caller's trace), its status and its access line. Use as a context
    manager around the call: an exception leaving the block sets the status (cancellation: CANCELLED or
    DEADLINE_EXCEEDED) and is re-raised; the access line is written and the span ended on the way out."""

    def __init__(self, call: Call, span_name: str) -> None:
        self.call = call
        self.started = time.monotonic()
        self.code = grpc.StatusCode.OK
        self.reason: str | None = None  # the refusal's message, for the access line
        self.access_mode = "none"  # the mode the access line shows
        self.output_tokens = 0
        self.tracer = tracing.tracer(tracing.GATEWAY)
        self.span = self.tracer.start_span(
            span_name,
            context=tracing.extract(call.metadata),
            kind=tracing.SpanKind.SERVER,
            attributes={"omnigate.request_id": call.request_id, "omnigate.protocol": call.protocol},
        )
        self._scope = contextlib.ExitStack()

    def __enter__(self) -> Self:
        self._scope.enter_context(tracing.activate(self.span, request_id=self.call.request_id))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            if exc is not None:
                self.ended_by(exc)
            self.finish()
        finally:
            self._scope.close()

    def ended_by(self, exc: BaseException) -> None:
        """The status an exception ends the call with (mapped in one place, omnigate.status)."""
        if not isinstance(exc, Exception):
            self.code = cancelled_code(self.call, self.started)  # CancelledError, GeneratorExit
        else:
            refusal = status.to_status(exc)
            self.code, self.reason = refusal.code, refusal.details

    def finish(self) -> None:
        """Writes the access line and ends the span (subclasses record their metrics first)."""
        _log_access(
            self.call,
            self.code.name,
            self.access_mode,
            time.monotonic() - self.started,
            self.output_tokens,
            self.reason,
        )
        if self.access_mode != "none":
            self.span.set_attribute("omnigate.mode", self.access_mode)
        tracing.end_span(self.span, self.code.name)


class ModelInfoObservation(CallObservation):
    """One GetModelInfo call: its span, the requests counter and its access line."""

    def __init__(self, call: Call, metrics: GatewayMetrics) -> None:
        super().__init__(call, "gateway.get_model_info")
        self._metrics = metrics

    def finish(self) -> None:
        self._metrics.requests.labels(self.call.rpc, self.code.name, "none").inc()
        super().finish()


class GenerateObservation(CallObservation):
    """One Generate call, from the front door's hand-over to its last event.

    Metrics: requests and latency by mode (the parsed request's, "unknown" before), in flight, admitted
    (from the end of validation to the end: the demand that wakes scaled-to-zero workers), the rejected
    counter for a request refused after admission and before any worker was called (admission counts its own
    refusals), upstream errors, time to the first output, token and audio, generated tokens."""

    def __init__(
        self, call: Call, metrics: GatewayMetrics, request: gateway_pb2.GenerateRequest | Undecodable
    ) -> None:
        super().__init__(call, "gateway.generate")
        self._metrics = metrics
        self.mode = "unknown"  # the metrics' mode label: the parsed request's
        public_mode = (
            PUBLIC_MODES.get(request.generation_mode)
            if isinstance(request, gateway_pb2.GenerateRequest)
            else None
        )
        self.access_mode = public_mode.value if public_mode is not None else "unknown"
        self._admitted = self._reached_worker = self._demand = False
        self._first_output = self._first_token = self._first_audio = False
        self._stream_span: Span | None = None
        metrics.in_flight.inc()

    def admitted(self) -> None:
        self._admitted = True

    def parsed(self, mode: str) -> None:
        """The request passed admission and validation: admitted demand until it ends."""
        self.mode = mode
        if not self._demand:
            self._demand = True
            self._metrics.admitted.inc()

    @contextlib.contextmanager
    def worker_call(self, request_id: str) -> Iterator[list[tuple[str, str]]]:
        """The span of the call to a worker (its client side; the worker's spans are its children), around
        the block; yields the metadata that carries its context and the request id to the worker. A gRPC
        failure of the call is counted as an upstream error."""
        self._reached_worker = True
        span = self.tracer.start_span("gateway.worker", kind=tracing.SpanKind.CLIENT)
        try:
            yield [*tracing.inject(span), (tracing.REQUEST_ID_METADATA, request_id)]
        except grpc.RpcError as exc:
            tracing.set_grpc_code(span, exc.code().name, client=True)
            self._metrics.upstream_errors.labels(exc.code().name).inc()
            raise
        finally:
            span.end()

    def event(self, event: gateway_pb2.GenerateResponse) -> None:
        """An event about to be streamed to the caller."""
        metrics, elapsed = self._metrics, time.monotonic() - self.started
        if event.HasField("summary"):
            self.output_tokens = event.summary.output_tokens
            metrics.generated_tokens.inc(event.summary.output_tokens)
            return
        if not self._first_output:
            self._first_output = True
            metrics.time_to_first_output.labels(self.mode).observe(elapsed)
            self._stream_span = self.tracer.start_span("gateway.stream")  # first output to the end
        if not self._first_token and event.HasField("text"):
            self._first_token = True
            metrics.time_to_first_token.labels(self.mode).observe(elapsed)
        elif not self._first_audio and event.HasField("audio"):
            self._first_audio = True
            metrics.time_to_first_audio.observe(elapsed)

    def ended_by(self, exc: BaseException) -> None:
        super().ended_by(exc)
        if isinstance(exc, Exception) and self._admitted and not self._reached_worker:
            self._metrics.count_rejection(self.code.name)

    def finish(self) -> None:
        metrics = self._metrics
        metrics.in_flight.dec()
        if self._demand:
            metrics.admitted.dec()
        metrics.requests.labels(self.call.rpc, self.code.name, self.mode).inc()
        metrics.request_latency.labels(self.mode).observe(time.monotonic() - self.started)
        if self._stream_span is not None:
            self._stream_span.end()
        super().finish()


def cancelled_code(call: Call, started: float) -> grpc.StatusCode:
    """The status of a request that ended by cancellation: DEADLINE_EXCEEDED when the caller's deadline
    passed (its timer started a little before ours: DEADLINE_SLACK_S), else CANCELLED (the caller left)."""
    remaining = call.time_remaining_s
    expired = remaining is not None and time.monotonic() - started >= remaining - DEADLINE_SLACK_S
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


def _log_access(
    call: Call, code: str, mode: str, duration_s: float, output_tokens: int, reason: str | None = None
) -> None:
    """The one access line of a call (both RPCs, every front door); a refused or failed call's line says
    why (the status message the caller got, cut to REASON_CHARS)."""
    reason = reason[:REASON_CHARS] if reason else None
    access_log.info(
        "%s %s %s mode=%s duration_s=%.3f output_tokens=%d%s",
        call.rpc,
        code,
        call.protocol,
        mode,
        duration_s,
        output_tokens,
        f" reason={reason!r}" if reason else "",
        extra={
            "rpc": call.rpc,
            "code": code,
            "protocol": call.protocol,
            "mode": mode,
            "duration_s": round(duration_s, 6),
            "output_tokens": output_tokens,
            **({"reason": reason} if reason else {}),
        },
    )
