"""The gateway's gRPC health services (``omnigate_gateway.health``) over HTTP, for HTTP load balancers.

- ``GET /health``: 200 while a model can answer now (the gRPC health service ``""``: a worker is ready).
- ``GET /health/readiness``: 200 while the gateway takes requests (from start-up until its drain begins),
  whether or not a worker is ready: without one it still answers each request itself, in-band.
- ``GET /health/liveness``: 200 while the process works (it is answered by the same event loop as requests).

Each answers 503 otherwise, with ``{"status": "SERVING" | "NOT_SERVING"}``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from omnigate_gateway.health import LIVENESS_SERVICE, READINESS_SERVICE

HealthProbe = Callable[[str], Awaitable[bool]]  # a gRPC health service name -> SERVING?

router = APIRouter()


def grpc_health_probe(health_servicer: health_aio.HealthServicer) -> HealthProbe:
    """Asks the gateway's gRPC health servicer."""

    async def probe(service: str) -> bool:
        # The servicer reads no context for a service it knows (the gateway sets all three at start-up), and
        # answers None only after aborting an unknown one; types-grpcio types the context as required and the
        # answer as never None.
        reply = await health_servicer.Check(
            health_pb2.HealthCheckRequest(service=service),
            None,  # type: ignore[arg-type]
        )
        serving = health_pb2.HealthCheckResponse.SERVING
        return reply is not None and reply.status == serving  # type: ignore[redundant-expr]

    return probe


async def _answer(request: Request, service: str) -> dict | JSONResponse:
    health: HealthProbe = request.app.state.health
    if await health(service):
        return {"status": "SERVING"}
    return JSONResponse({"status": "NOT_SERVING"}, status_code=503)


# GET routes take HEAD too: uvicorn sends the same status and headers without the body.
@router.api_route("/health", methods=["GET", "HEAD"], response_model=None)
async def get_health(request: Request) -> dict | JSONResponse:
    return await _answer(request, "")


@router.api_route("/health/readiness", methods=["GET", "HEAD"], response_model=None)
async def get_readiness(request: Request) -> dict | JSONResponse:
    return await _answer(request, READINESS_SERVICE)


@router.api_route("/health/liveness", methods=["GET", "HEAD"], response_model=None)
async def get_liveness(request: Request) -> dict | JSONResponse:
    return await _answer(request, LIVENESS_SERVICE)
