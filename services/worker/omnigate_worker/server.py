"""The worker's gRPC server: WorkerService, grpc.health.v1 and reflection."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health

from omnigate import status, tls, validation
from omnigate.conversation import GenerationRequest
from omnigate.errors import Unavailable
from omnigate.grpc_server import add_service, finish_server
from omnigate.worker.v1 import worker_pb2, worker_pb2_grpc
from omnigate_worker import convert
from omnigate_worker.engine.base import Engine
from omnigate_worker.metrics import WorkerMetrics
from omnigate_worker.observation import GenerateObservation
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
        observed = GenerateObservation(self._metrics, context)  # metrics, spans, access line
        job = None
        try:
            engine, scheduler = self._ready()
            observed.stage = "queue"
            scheduler.check_accepting()  # a draining worker refuses before reading the request's media
            observed.stage = "request"
            with observed.span("worker.receive"):  # the spec and the media chunks
                request = await convert.read_request(
                    request_iterator, self._settings.max_request_media_bytes, self._limits
                )
            observed.request(request)
            self._check_limits(request)
            engine.validate(request)
            observed.stage = "queue"
            job = scheduler.submit(request, context.time_remaining())
            observed.stage = "job"
            async for event in job.events():
                observed.event(event, job)
                yield convert.event_to_proto(event)
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: cancelled while at a yield
            observed.cancelled(context)
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            observed.failed(exc)
            await status.abort(context, exc)
        finally:
            if job is not None:
                job.cancel()  # no-op when finished; frees the engine when the client went away
            observed.finish()

    def _check_limits(self, request: GenerationRequest) -> None:
        """The parameter domains both doors apply (``omnigate.validation``); the gateway checked them too,
        but a client may call the worker directly."""
        validation.check_request(request, self._limits, self._settings.max_new_tokens_limit)


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
