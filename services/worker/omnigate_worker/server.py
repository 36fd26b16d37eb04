"""The worker's gRPC server: WorkerService, grpc.health.v1 and reflection."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health

from omnigate import status
from omnigate.conversation import AudioChunk, ImageOutput, Summary, TextDelta
from omnigate.errors import InvalidInput, Unavailable
from omnigate.grpc_server import finish_server
from omnigate.worker.v1 import worker_pb2, worker_pb2_grpc
from omnigate_worker import convert
from omnigate_worker.engine import Engine
from omnigate_worker.metrics import WorkerMetrics
from omnigate_worker.scheduler import Scheduler
from omnigate_worker.settings import WorkerSettings

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Serves WorkerService; answers UNAVAILABLE until ``attach`` hands it a loaded engine."""

    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics) -> None:
        self._engine: Engine | None = None
        self._scheduler: Scheduler | None = None
        self._settings = settings
        self._metrics = metrics

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
        self._metrics.in_flight.inc()
        try:
            engine, scheduler = self._ready()
            request = await convert.read_request(request_iterator, self._settings.max_request_media_bytes)
            mode = request.mode.value
            self._check_limits(request)
            engine.validate(request)
            job = scheduler.submit(request, context.time_remaining())
            async for event in job.events():
                if first_output is None and isinstance(event, TextDelta | AudioChunk | ImageOutput):
                    first_output = time.monotonic()
                    self._metrics.time_to_first_output.labels(mode).observe(first_output - started)
                if isinstance(event, Summary):
                    event.timings.queue_s = (job.started_at or job.enqueued_at) - job.enqueued_at
                    self._metrics.generated_tokens.inc(event.output_tokens)
                    self._metrics.prompt_tokens.inc(event.prompt_tokens)
                yield convert.event_to_proto(event)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            code = status.to_status(exc).code
            await status.abort(context, exc)
        finally:
            if job is not None:
                job.cancel()  # no-op when finished; frees the engine when the client went away
            self._metrics.in_flight.dec()
            self._metrics.requests.labels(code.name, mode).inc()
            self._metrics.request_latency.labels(mode).observe(time.monotonic() - started)

    def _check_limits(self, request) -> None:
        limit = self._settings.max_new_tokens_limit
        if request.params.max_new_tokens <= 0:
            raise InvalidInput("max_new_tokens must be > 0")
        if request.params.min_new_tokens > request.params.max_new_tokens:
            raise InvalidInput(
                f"min_new_tokens ({request.params.min_new_tokens}) exceeds max_new_tokens ({request.params.max_new_tokens})"
            )
        if request.params.max_new_tokens > limit:
            raise InvalidInput(f"max_new_tokens is {request.params.max_new_tokens}; the limit is {limit}")


def build_server(
    servicer: WorkerServicer, settings: WorkerSettings, health_servicer: health.aio.HealthServicer
) -> tuple[grpc.aio.Server, int]:
    """Creates the server and binds it; returns it with the bound port (not started)."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    server = grpc.aio.server(options=options)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = finish_server(
        server,
        SERVICE_NAME,
        health_servicer,
        enable_reflection=settings.reflection,
        host=settings.host,
        port=settings.port,
    )
    return server, port
