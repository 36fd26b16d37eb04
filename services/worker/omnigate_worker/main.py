"""Worker entry point: ``omnigate-worker [--model ID_OR_PATH] [--port N] ...`` (flags or OMNIGATE_WORKER_*)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry

from omnigate import tracing
from omnigate.grpc_server import start_health_server
from omnigate.lifecycle import run_service, start_metrics_server, write_ports_file
from omnigate_worker.metrics import WorkerMetrics
from omnigate_worker.scheduler import Scheduler
from omnigate_worker.server import SERVICE_NAME, WorkerServicer, build_server
from omnigate_worker.settings import WorkerSettings

log = logging.getLogger("omnigate_worker")


async def serve(settings: WorkerSettings) -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics_port = start_metrics_server(settings.metrics_host, settings.metrics_port, registry)

    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    # The server starts before the model loads so that health checks answer NOT_SERVING meanwhile.
    servicer = WorkerServicer(settings, metrics)
    server, port = build_server(servicer, settings, health_servicer)
    await server.start()
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


def _load_engine(settings: WorkerSettings, metrics: WorkerMetrics):
    from omnigate_worker import loading
    from omnigate_worker.transformers_engine import TransformersEngine

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


def main() -> None:
    run_service(tracing.WORKER, WorkerSettings(_cli_parse_args=True), serve)


if __name__ == "__main__":
    main()
