"""Gateway entry point: ``omnigate-gateway [--port N] [--worker-target HOST:PORT] ...`` (or OMNIGATE_GATEWAY_*)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry

from omnigate import tracing
from omnigate.grpc_server import start_health_server
from omnigate.lifecycle import run_service, start_metrics_server, write_ports_file
from omnigate_gateway.auth import Authenticator
from omnigate_gateway.core import GatewayCore
from omnigate_gateway.fetch import MediaFetcher
from omnigate_gateway.http_api import HttpApiServer, create_app, grpc_health_probe
from omnigate_gateway.ingest import MediaIngestor
from omnigate_gateway.metrics import GatewayMetrics
from omnigate_gateway.resolver import Resolver
from omnigate_gateway.server import SERVICE_NAME, GatewayServicer, build_server
from omnigate_gateway.settings import GatewaySettings
from omnigate_gateway.worker_client import WorkerPool

log = logging.getLogger("omnigate_gateway")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def watch_workers(workers: WorkerPool, health_servicer) -> None:
    """Keeps the gateway's health in step with its workers: SERVING while at least one worker is ready."""
    async for ready in workers.watch_ready():
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, SERVING if ready else NOT_SERVING)
        log.info(
            "gateway %s (workers %s: %s)",
            "SERVING" if ready else "NOT_SERVING",
            workers.target,
            ", ".join(f"{n} {state}" for state, n in workers.counts().items() if n) or "none found",
        )


async def serve(settings: GatewaySettings, *, resolver: Resolver | None = None) -> None:
    """Runs the gateway until SIGTERM/SIGINT. ``resolver`` replaces the system's name resolution (tests)."""
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    metrics_port = start_metrics_server(settings.metrics_host, settings.metrics_port, registry)

    fetcher = MediaFetcher(settings.fetch_limits(), resolver=resolver)
    ingestor = MediaIngestor(fetcher, settings, metrics)
    worker = WorkerPool(settings, metrics)
    worker.start()
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, NOT_SERVING)
    core = GatewayCore(settings, worker, ingestor, metrics, Authenticator(settings, metrics))
    server, port = build_server(GatewayServicer(core), settings, health_servicer)
    # The OpenAI-compatible HTTP API: bound first (a busy port fails the start), served on this event loop.
    http = None
    if settings.http_port >= 0:
        http = HttpApiServer(create_app(core, settings, grpc_health_probe(health_servicer)), settings)
    await server.start()
    if http is not None:
        await http.start()
        log.info("OpenAI-compatible HTTP API on %s/v1", http.url)
    health_server, health_port = await start_health_server(
        health_servicer, settings.host, settings.health_port
    )
    if settings.ports_file:
        write_ports_file(
            settings.ports_file,
            port,
            metrics_port,
            health_port=health_port,
            http_port=http.port if http else None,
        )
    log.info("gateway gRPC listening on %s:%d, worker %s", settings.host, port, settings.worker_target)
    watcher = asyncio.create_task(watch_workers(worker, health_servicer))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("draining: NOT_SERVING, finishing in-flight requests (up to %.0f s)", settings.grace_period_s)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await health_servicer.enter_graceful_shutdown()
    await asyncio.gather(server.stop(grace=settings.grace_period_s), *([http.stop()] if http else []))
    if health_server is not None:
        await health_server.stop(grace=None)
    await worker.close()
    await fetcher.aclose()
    ingestor.close()
    log.info("gateway stopped")


def main() -> None:
    run_service(tracing.GATEWAY, GatewaySettings(_cli_parse_args=True), serve)


if __name__ == "__main__":
    main()
