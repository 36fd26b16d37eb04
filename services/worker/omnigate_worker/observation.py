"""Everything observed about one Generate call, in one place: metrics, spans, the access line.

The request path (``server.WorkerServicer.Generate``) says where it is (``stage``), hands over the request
once read and each event as it streams, and reports how it ended; this records the rest. The metrics are
the contract in docs/metrics.md.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sized
from typing import TYPE_CHECKING, Any, cast

import grpc

from omnigate import status, tracing
from omnigate.conversation import AudioChunk, Event, GenerationRequest, ImageOutput, Summary, TextDelta
from omnigate.errors import DeadlineExceeded, InvalidInput, LimitExceeded, Unavailable
from omnigate_worker.metrics import Playback, WorkerMetrics

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from omnigate_worker.scheduler import Job

access_log = logging.getLogger("omnigate_worker.access")

# (where Generate failed, the error) -> the rejected counter's reason. Prompts over the token limit and
# out-of-memory failures are counted by the scheduler, which tells them apart.
REJECTIONS: dict[tuple[str, type[BaseException]], str] = {
    ("not_ready", Unavailable): "not_ready",
    ("request", InvalidInput): "invalid_argument",
    ("request", LimitExceeded): "too_long",
    ("queue", LimitExceeded): "queue_full",
    ("queue", Unavailable): "draining",
    ("job", InvalidInput): "invalid_argument",
}


class GenerateObservation:
    """One Generate call's observation, from its first byte to its end (``finish``)."""

    def __init__(self, metrics: WorkerMetrics, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._metrics = metrics
        self.started = time.monotonic()
        self.stage = "not_ready"  # how far the request got (for the rejected counter)
        self.mode = "unknown"
        self.code = grpc.StatusCode.OK
        self._summary: Summary | None = None
        self._first_output: float | None = None
        self._first_token = False
        self._playback = Playback()
        self._stream_span: Span | None = None
        metrics.in_flight.inc()
        # The request's span continues the gateway's trace (W3C traceparent in the metadata); it and the
        # request id stay current for this RPC's task, and the job carries them to the engine's threads.
        metadata = tuple(context.invocation_metadata() or ())
        request_id = dict(metadata).get(tracing.REQUEST_ID_METADATA)  # str: only "-bin" keys carry bytes
        self._request_id = tracing.sane_request_id(request_id if isinstance(request_id, str) else None)
        self._tracer = tracing.tracer(tracing.WORKER)
        self._span = self._tracer.start_span(
            "worker.generate", context=tracing.extract(metadata), kind=tracing.SpanKind.SERVER
        )
        self._scope = contextlib.ExitStack()
        self._scope.enter_context(tracing.activate(self._span, request_id=self._request_id))

    def span(self, name: str) -> contextlib.AbstractContextManager[Span]:
        """A child span of the call, current while the block runs."""
        return self._tracer.start_as_current_span(name)

    def request(self, request: GenerationRequest) -> None:
        """The request is read: its mode labels the metrics; its id names the logs if the metadata had none."""
        if self._request_id is None and tracing.sane_request_id(request.request_id):
            self._request_id = request.request_id
            self._scope.enter_context(tracing.activate(request_id=self._request_id))
        self.mode = request.mode.value

    def event(self, event: Event, job: Job) -> None:
        """An event about to be streamed to the caller."""
        metrics, now = self._metrics, time.monotonic()
        if self._first_output is None and isinstance(event, TextDelta | AudioChunk | ImageOutput):
            self._first_output = now
            metrics.time_to_first_output.labels(self.mode).observe(now - self.started)
            self._stream_span = self._tracer.start_span("worker.stream")  # first output to the end
        if isinstance(event, AudioChunk) and event.sample_rate > 0:
            if self._playback.first_at is None:
                metrics.time_to_first_audio.observe(now - self.started)
            # AudioChunk.samples is typed object; it holds a numpy array
            self._playback.chunk(len(cast(Sized, event.samples)) / event.sample_rate, now)
        if not self._first_token and isinstance(event, TextDelta):
            self._first_token = True
            metrics.time_to_first_token.labels(self.mode).observe(now - self.started)
        if isinstance(event, Summary):
            self._summary = event
            event.timings.queue_s = (job.started_at or job.enqueued_at) - job.enqueued_at
            metrics.generated_tokens.inc(event.output_tokens)
            metrics.prompt_tokens.inc(event.prompt_tokens)
            if event.audio_seconds > 0:
                metrics.audio_generated.inc(event.audio_seconds)
                metrics.audio_underrun.observe(self._playback.underrun_s)
                metrics.speech_real_time_factor.observe(event.timings.generate_s / event.audio_seconds)

    def cancelled(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """The caller went away, or its deadline passed, while the call ran."""
        # None when the call has no deadline (grpc.aio), though the stubs say float
        remaining: float | None = context.time_remaining()
        expired = remaining is not None and remaining <= 0.1  # the caller's timer runs a little ahead
        self.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        self._metrics.cancelled.labels("deadline" if expired else "client").inc()

    def failed(self, error: BaseException) -> None:
        """The call ends with ``error`` (mapped to its status in one place, omnigate.status)."""
        self.code = status.to_status(error).code
        if isinstance(error, DeadlineExceeded):
            self._metrics.cancelled.labels("deadline").inc()
        elif (reason := REJECTIONS.get((self.stage, type(error)))) is not None:
            self._metrics.rejected.labels(reason).inc()

    def finish(self) -> None:
        metrics, duration = self._metrics, time.monotonic() - self.started
        metrics.in_flight.dec()
        metrics.requests.labels(self.code.name, self.mode).inc()
        metrics.request_latency.labels(self.mode).observe(duration)
        if self._stream_span is not None:
            self._stream_span.end()
        _log_access(self.code.name, self.mode, duration, self._summary)
        self._span.set_attribute("omnigate.mode", self.mode)
        tracing.end_span(self._span, self.code.name)
        self._scope.close()


def _log_access(code: str, mode: str, duration_s: float, summary: Summary | None) -> None:
    """One line per finished request (the request id comes from the context)."""
    prompt_tokens = summary.prompt_tokens if summary is not None else 0
    output_tokens = summary.output_tokens if summary is not None else 0
    queue_s = summary.timings.queue_s if summary is not None else 0.0
    access_log.info(
        "Generate %s mode=%s duration_s=%.3f queue_s=%.3f prompt_tokens=%d output_tokens=%d",
        code,
        mode,
        duration_s,
        queue_s,
        prompt_tokens,
        output_tokens,
        extra={
            "rpc": "Generate",
            "code": code,
            "mode": mode,
            "duration_s": round(duration_s, 6),
            "queue_s": round(queue_s, 6),
            "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens,
        },
    )
