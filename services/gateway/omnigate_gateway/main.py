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
from omnigate.lifecycle import (
    Listener,
    binding,
    check_ports_free,
    run_service,
    settings_from_command_line,
    start_metrics_server,
    write_ports_file,
)
from omnigate_gateway.auth import Authenticator
from omnigate_gateway.core import GatewayCore
from omnigate_gateway.grpc_api.server import GatewayServicer, build_server
from omnigate_gateway.health import LIVENESS_SERVICE, READINESS_SERVICE, WORKER_FOLLOWING_SERVICES
from omnigate_gateway.media.fetch import MediaFetcher
from omnigate_gateway.media.ingest import MediaIngestor
from omnigate_gateway.media.resolver import Resolver
from omnigate_gateway.metrics import GatewayMetrics
from omnigate_gateway.openai_api.app import create_app
from omnigate_gateway.openai_api.routes.health import grpc_health_probe
from omnigate_gateway.openai_api.server import HttpApiServer
from omnigate_gateway.settings import GatewaySettings
from omnigate_gateway.workers.pool import WorkerPool

log = logging.getLogger("omnigate_gateway")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

DESCRIPTION = """\
The Omnigate gateway: the public side of an Omnigate deployment. It takes generation requests over gRPC
(omnigate.gateway.v1.GatewayService) and over an OpenAI-compatible HTTP API (/v1/chat/completions, ...),
fetches and decodes their media (images, audio, video by URL or inline) within its limits, and streams
them to the workers that run the model (omnigate-worker), then streams their answers back. It serves
grpc.health.v1 ("" SERVING while a worker is ready; "readiness" SERVING until it drains; "liveness"),
reflection and Prometheus metrics.

Every setting is a flag or an environment variable (shown in brackets); a flag wins over the variable."""

EPILOG = """\
examples:
  omnigate-gateway --worker-target 127.0.0.1:50061
  OMNIGATE_GATEWAY_WORKER_TARGET=dns:///omnigate-worker:50061 OMNIGATE_GATEWAY_HTTP_PORT=-1 omnigate-gateway

More in README.md ("Configuration"); `make run` starts a worker and a gateway for local use."""


def listeners(settings: GatewaySettings) -> list[Listener]:
    """The gateway's ports, with the setting (and the `make run` variable) that changes each."""
    return [
        Listener("gateway gRPC", settings.host, settings.port, "OMNIGATE_GATEWAY_PORT", "GATEWAY_PORT"),
        Listener(
            "gateway metrics",
            settings.metrics_host,
            settings.metrics_port,
            "OMNIGATE_GATEWAY_METRICS_PORT",
            "GATEWAY_METRICS_PORT",
        ),
        Listener(
            "HTTP API", settings.http_host, settings.http_port, "OMNIGATE_GATEWAY_HTTP_PORT", "HTTP_PORT"
        ),
        Listener("gateway health", settings.host, settings.health_port, "OMNIGATE_GATEWAY_HEALTH_PORT"),
    ]


async def watch_workers(
    workers: WorkerPool, health_servicer: health.aio.HealthServicer, ready_message: str = ""
) -> None:
    """Keeps the gateway's health in step with its workers: SERVING while at least one worker is ready.
    The first time it can serve, it logs ``ready_message`` (the line a user waits for)."""
    announced = False
    async for ready in workers.watch_ready():
        for name in WORKER_FOLLOWING_SERVICES:
            await health_servicer.set(name, SERVING if ready else NOT_SERVING)
        log.info(
            "gateway %s (workers %s: %s)",
            "SERVING" if ready else "NOT_SERVING",
            workers.target,
            ", ".join(f"{n} {state}" for state, n in workers.counts().items() if n) or "none found",
        )
        if ready and not announced and ready_message:
            log.info("%s", ready_message)
            announced = True


async def serve(settings: GatewaySettings, *, resolver: Resolver | None = None) -> None:
    """Runs the gateway until SIGTERM/SIGINT. ``resolver`` replaces the system's name resolution (tests)."""
    grpc_listener, metrics_listener, http_listener, health_listener = listeners(settings)
    check_ports_free([grpc_listener, metrics_listener, http_listener, health_listener])
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    with binding(metrics_listener):
        metrics_port = start_metrics_server(settings.metrics_host, settings.metrics_port, registry)

    fetcher = MediaFetcher(settings.fetch_limits(), resolver=resolver)
    ingestor = MediaIngestor(fetcher, settings, metrics)
    worker = WorkerPool(settings, metrics)
    worker.start()
    health_servicer = health.aio.HealthServicer()
    for name in (*WORKER_FOLLOWING_SERVICES, READINESS_SERVICE):
        await health_servicer.set(name, NOT_SERVING)
    await health_servicer.set(LIVENESS_SERVICE, SERVING)
    core = GatewayCore(settings, worker, ingestor, metrics, Authenticator(settings, metrics))
    with binding(grpc_listener):
        server, port = build_server(GatewayServicer(core), settings, health_servicer)
    # The OpenAI-compatible HTTP API: bound first (a busy port fails the start), served on this event loop.
    http = None
    if settings.http_port >= 0:
        http = HttpApiServer(create_app(core, settings, grpc_health_probe(health_servicer)), settings)
    await server.start()
    if http is not None:
        await http.start()
        log.info("OpenAI-compatible HTTP API on %s/v1", http.url)
    with binding(health_listener):
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
    ready = f"Omnigate is ready: gRPC {settings.host}:{port}"
    if http is not None:
        ready += f", HTTP {http.url}/v1"
    if metrics_port is not None:
        ready += f", metrics http://{settings.metrics_host}:{metrics_port}/metrics"
    await health_servicer.set(READINESS_SERVICE, SERVING)  # every door listens: requests are answered
    watcher = asyncio.create_task(watch_workers(worker, health_servicer, ready))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("draining: NOT_SERVING, finishing in-flight requests (up to %.0f s)", settings.grace_period_s)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    # Not HealthServicer.enter_graceful_shutdown, which would fail liveness too: a draining gateway is not
    # ready for new requests, but it is alive while it finishes the ones it has.
    for name in (*WORKER_FOLLOWING_SERVICES, READINESS_SERVICE):
        await health_servicer.set(name, NOT_SERVING)
    await asyncio.gather(server.stop(grace=settings.grace_period_s), *([http.stop()] if http else []))
    if health_server is not None:
        await health_server.stop(grace=None)
    await worker.close()
    await fetcher.aclose()
    ingestor.close()
    log.info("gateway stopped")


def main() -> None:
    settings = settings_from_command_line(GatewaySettings, "omnigate-gateway", DESCRIPTION, EPILOG)
    run_service(tracing.GATEWAY, settings, serve)


if __name__ == "__main__":
    main()
