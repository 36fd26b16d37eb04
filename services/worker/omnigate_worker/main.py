"""Worker entry point: ``omnigate-worker [--model ID_OR_PATH] [--port N] ...`` (flags or OMNIGATE_WORKER_*)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from typing import TYPE_CHECKING

from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry

from omnigate import tracing
from omnigate.grpc_server import start_health_server
from omnigate.lifecycle import (
    Listener,
    binding,
    check_ports_free,
    run_service,
    settings_from_command_line,
    start_metrics_server,
    write_ports_file,
)
from omnigate_worker import liveness
from omnigate_worker.metrics import WorkerMetrics
from omnigate_worker.scheduler import Scheduler
from omnigate_worker.server import SERVICE_NAME, WorkerServicer, build_server
from omnigate_worker.settings import WorkerSettings

if TYPE_CHECKING:
    from omnigate_worker.engine.transformers_engine import TransformersEngine

log = logging.getLogger("omnigate_worker")

DESCRIPTION = """\
The Omnigate worker: loads one Hugging Face multimodal model through transformers
(AutoModelForMultimodalLM + AutoProcessor, on a GPU or the CPU) and generates for the gateway
(omnigate-gateway) over gRPC (omnigate.worker.v1.WorkerService): text, speech or images, streamed, with
requests batched together. It serves grpc.health.v1 (SERVING once the model is loaded and warmed up),
reflection and Prometheus metrics. Clients talk to the gateway, not to the worker.

Every setting is a flag or an environment variable (shown in brackets); a flag wins over the variable."""

EPILOG = """\
examples:
  omnigate-worker --model models/tiny-qwen2.5-omni
  omnigate-worker --model Qwen/Qwen2.5-Omni-3B --dtype bfloat16 --device cuda:0

More in README.md ("Configuration"); `make run` starts a worker and a gateway for local use."""


def listeners(settings: WorkerSettings) -> list[Listener]:
    """The worker's ports, with the setting (and the `make run` variable) that changes each."""
    return [
        Listener("worker gRPC", settings.host, settings.port, "OMNIGATE_WORKER_PORT", "WORKER_PORT"),
        Listener(
            "worker metrics",
            settings.metrics_host,
            settings.metrics_port,
            "OMNIGATE_WORKER_METRICS_PORT",
            "WORKER_METRICS_PORT",
        ),
        Listener("worker health", settings.host, settings.health_port, "OMNIGATE_WORKER_HEALTH_PORT"),
    ]


async def serve(settings: WorkerSettings) -> None:
    grpc_listener, metrics_listener, health_listener = listeners(settings)
    check_ports_free([grpc_listener, metrics_listener, health_listener])
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    with binding(metrics_listener):
        metrics_port = start_metrics_server(settings.metrics_host, settings.metrics_port, registry)

    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # Alive while loading (the startup probe bounds that); NOT_SERVING for good once the engine dies.
    await health_servicer.set(liveness.LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    # The server starts before the model loads so that health checks answer NOT_SERVING meanwhile.
    servicer = WorkerServicer(settings, metrics)
    with binding(grpc_listener):
        server, port = build_server(servicer, settings, health_servicer)
    await server.start()
    with binding(health_listener):
        health_server, health_port = await start_health_server(
            health_servicer, settings.host, settings.health_port
        )
    if settings.ports_file:
        write_ports_file(settings.ports_file, port, metrics_port, health_port=health_port)
    log.info("worker gRPC listening on %s:%d (loading %s)", settings.host, port, settings.model)

    started = time.monotonic()
    engine = await asyncio.to_thread(_load_engine, settings, metrics)
    if settings.warmup:
        await asyncio.to_thread(engine.warmup)
    metrics.model_load.set(time.monotonic() - started)
    scheduler = Scheduler(engine, settings, metrics)
    scheduler.start()
    liveness_watch = asyncio.create_task(liveness.watch(scheduler, health_servicer), name="liveness")
    servicer.attach(engine, scheduler)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "worker SERVING %s (%s) after %.1f s", settings.model, engine.info.device, time.monotonic() - started
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    liveness_watch.cancel()

    log.info("draining: NOT_SERVING, finishing in-flight requests (up to %.0f s)", settings.grace_period_s)
    scheduler.stop_accepting()  # first: once health says NOT_SERVING, every new call is refused
    await health_servicer.enter_graceful_shutdown()
    deadline = time.monotonic() + settings.grace_period_s
    while scheduler.busy() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await server.stop(grace=max(0.0, deadline - time.monotonic()))
    if health_server is not None:
        await health_server.stop(grace=None)
    scheduler.shutdown()
    log.info("worker stopped")


def _load_engine(settings: WorkerSettings, metrics: WorkerMetrics) -> TransformersEngine:
    from omnigate_worker.engine import loading
    from omnigate_worker.engine.transformers_engine import TransformersEngine

    _route_transformers_logs(settings.log_format)
    loaded = loading.load(
        settings.model,
        settings.device,
        settings.dtype,
        settings.attn_implementation,
        settings.trust_remote_code,
        settings.torch_threads,
    )
    metrics.set_model(settings.model, str(loaded.device), str(loaded.dtype).removeprefix("torch."))
    return TransformersEngine(loaded, settings, settings.model, metrics=metrics)


def _route_transformers_logs(log_format: str) -> None:
    """transformers writes its warnings through a handler of its own (plain "[transformers] ..." lines,
    JSON logs or not); send them through the service's handler and format instead. Its progress bars
    (loading weights) are for a terminal, not for JSON log lines or a log file."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    if log_format == "json" or not sys.stderr.isatty():
        transformers_logging.disable_progress_bar()


def main() -> None:
    settings = settings_from_command_line(WorkerSettings, "omnigate-worker", DESCRIPTION, EPILOG)
    run_service(tracing.WORKER, settings, serve)


if __name__ == "__main__":
    main()
