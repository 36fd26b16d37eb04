"""The worker's gRPC server: WorkerService, grpc.health.v1 and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from grpc_health.v1 import health

from omnigate import status, tls, tracing, validation
from omnigate.conversation import AudioChunk, ImageOutput, Summary, TextDelta
from omnigate.errors import DeadlineExceeded, InvalidInput, LimitExceeded, Unavailable
from omnigate.grpc_server import add_service, finish_server
from omnigate.worker.v1 import worker_pb2, worker_pb2_grpc
from omnigate_worker import convert
from omnigate_worker.engine import Engine
from omnigate_worker.metrics import Playback, WorkerMetrics
from omnigate_worker.scheduler import Scheduler
from omnigate_worker.settings import WorkerSettings

log = logging.getLogger(__name__)
access_log = logging.getLogger("omnigate_worker.access")

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name

# (where Generate failed, the error) -> the rejected counter's reason. Prompts over the token limit and
# out-of-memory failures are counted by the scheduler, which tells them apart.
REJECTIONS = {
    ("not_ready", Unavailable): "not_ready",
    ("request", InvalidInput): "invalid_argument",
    ("request", LimitExceeded): "too_long",
    ("queue", LimitExceeded): "queue_full",
    ("queue", Unavailable): "draining",
    ("job", InvalidInput): "invalid_argument",
}


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Serves WorkerService; answers UNAVAILABLE until ``attach`` hands it a loaded engine."""

    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics) -> None:
        self._engine: Engine | None = None
        self._scheduler: Scheduler | None = None
        self._settings = settings
        self._metrics = metrics
        self._limits = validation.RequestLimits(settings.max_messages, settings.max_content_parts)

    def attach(self, engine: Engine, scheduler: Scheduler) -> None:
        self._engine = engine
        self._scheduler = scheduler

    def _ready(self) -> tuple[Engine, Scheduler]:
        if self._engine is None or self._scheduler is None:
            raise Unavailable("the worker is still loading its model; retry shortly")
        return self._engine, self._scheduler

    async def GetModelInfo(self, request, context):  # noqa: N802 - gRPC method name
        try:
            engine, _ = self._ready()
        except Unavailable as exc:
            await status.abort(context, exc)
        return convert.model_info_to_proto(
            engine.info, self._settings.max_new_tokens_limit, self._settings.max_request_media_bytes
        )

    async def Generate(self, request_iterator, context):  # noqa: N802 - gRPC method name
        started = time.monotonic()
        mode = "unknown"
        code = grpc.StatusCode.OK
        job = None
        first_output = None
        first_token = False
        stage = "not_ready"  # how far the request got (for the rejected counter)
        self._metrics.in_flight.inc()
        # The request's span continues the gateway's trace (W3C traceparent in the metadata); it and the
        # request id stay current for this RPC's task, and the job carries them to the engine's threads.
        invocation_metadata = tuple(context.invocation_metadata() or ())
        request_id = tracing.sane_request_id(dict(invocation_metadata).get(tracing.REQUEST_ID_METADATA))
        tracer = tracing.tracer(tracing.WORKER)
        span = tracer.start_span(
            "worker.generate", context=tracing.extract(invocation_metadata), kind=tracing.SpanKind.SERVER
        )
        scope = contextlib.ExitStack()
        scope.enter_context(tracing.activate(span, request_id=request_id))
        summary = stream_span = None
        playback = Playback()
        try:
            engine, scheduler = self._ready()
            stage = "queue"
            scheduler.check_accepting()  # a draining worker refuses before reading the request's media
            stage = "request"
            with tracer.start_as_current_span("worker.receive"):  # the spec and the media chunks
                request = await convert.read_request(
                    request_iterator, self._settings.max_request_media_bytes, self._limits
                )
            if request_id is None and tracing.sane_request_id(request.request_id):
                request_id = request.request_id
                scope.enter_context(tracing.activate(request_id=request_id))
            mode = request.mode.value
            self._check_limits(request)
            engine.validate(request)
            stage = "queue"
            job = scheduler.submit(request, context.time_remaining())
            stage = "job"
            async for event in job.events():
                if first_output is None and isinstance(event, TextDelta | AudioChunk | ImageOutput):
                    first_output = time.monotonic()
                    self._metrics.time_to_first_output.labels(mode).observe(first_output - started)
                    stream_span = tracer.start_span("worker.stream")  # first output to the end
                if isinstance(event, AudioChunk) and event.sample_rate > 0:
                    if playback.first_at is None:
                        self._metrics.time_to_first_audio.observe(time.monotonic() - started)
                    playback.chunk(len(event.samples) / event.sample_rate)
                if not first_token and isinstance(event, TextDelta):
                    first_token = True
                    self._metrics.time_to_first_token.labels(mode).observe(time.monotonic() - started)
                if isinstance(event, Summary):
                    summary = event
                    event.timings.queue_s = (job.started_at or job.enqueued_at) - job.enqueued_at
                    self._metrics.generated_tokens.inc(event.output_tokens)
                    self._metrics.prompt_tokens.inc(event.prompt_tokens)
                    if event.audio_seconds > 0:
                        self._metrics.audio_generated.inc(event.audio_seconds)
                        self._metrics.audio_underrun.observe(playback.underrun_s)
                        self._metrics.speech_real_time_factor.observe(
                            event.timings.generate_s / event.audio_seconds
                        )
                yield convert.event_to_proto(event)
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: cancelled while at a yield
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0.1  # the caller's timer runs a little ahead
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            self._metrics.cancelled.labels("deadline" if expired else "client").inc()
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            code = status.to_status(exc).code
            if isinstance(exc, DeadlineExceeded):
                self._metrics.cancelled.labels("deadline").inc()
            elif (reason := REJECTIONS.get((stage, type(exc)))) is not None:
                self._metrics.rejected.labels(reason).inc()
            await status.abort(context, exc)
        finally:
            if job is not None:
                job.cancel()  # no-op when finished; frees the engine when the client went away
            self._metrics.in_flight.dec()
            self._metrics.requests.labels(code.name, mode).inc()
            self._metrics.request_latency.labels(mode).observe(time.monotonic() - started)
            if stream_span is not None:
                stream_span.end()
            _log_access(code.name, mode, time.monotonic() - started, summary)
            span.set_attribute("omnigate.mode", mode)
            tracing.end_span(span, code.name)
            scope.close()

    def _check_limits(self, request) -> None:
        """The parameter domains both doors apply (``omnigate.validation``); the gateway checked them too,
        but a client may call the worker directly."""
        validation.check_request(request, self._limits, self._settings.max_new_tokens_limit)


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


def build_server(
    servicer: WorkerServicer, settings: WorkerSettings, health_servicer: health.aio.HealthServicer
) -> tuple[grpc.aio.Server, int]:
    """Creates the server and binds it; returns it with the bound port (not started)."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.http2.ping_timeout_ms", int(settings.keepalive_timeout_s * 1000)),  # what gRPC 1.85 applies
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # Gateways ping every OMNIGATE_GATEWAY_WORKER_KEEPALIVE_TIME_S to detect a hung worker, also while a
        # call sends nothing (a long prefill): accept that instead of answering GOAWAY "too_many_pings".
        ("grpc.http2.min_ping_interval_without_data_ms", int(settings.keepalive_min_ping_interval_s * 1000)),
    ]
    server = grpc.aio.server(options=options)
    add_service(server, servicer, worker_pb2.DESCRIPTOR.services_by_name["WorkerService"])
    port = finish_server(
        server,
        SERVICE_NAME,
        health_servicer,
        enable_reflection=settings.reflection,
        host=settings.host,
        port=settings.port,
        credentials=tls.server_credentials(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        ),
    )
    return server, port
