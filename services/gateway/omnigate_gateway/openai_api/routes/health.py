"""``GET /health``: 200 while the gateway is SERVING (its gRPC health), 503 otherwise."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

HealthProbe = Callable[[], Awaitable[bool]]

router = APIRouter()


def grpc_health_probe(health_servicer: health_aio.HealthServicer) -> HealthProbe:
    """/health follows the gateway's gRPC health (SERVING only while a worker is ready and not draining)."""

    async def probe() -> bool:
        # The servicer reads no context for a service it knows ("" always is), and answers None only after
        # aborting an unknown one; types-grpcio types the context as required and the answer as never None.
        reply = await health_servicer.Check(
            health_pb2.HealthCheckRequest(service=""),
            None,  # type: ignore[arg-type]
        )
        serving = health_pb2.HealthCheckResponse.SERVING
        return reply is not None and reply.status == serving  # type: ignore[redundant-expr]

    return probe


# GET routes take HEAD too: uvicorn sends the same status and headers without the body.
@router.api_route("/health", methods=["GET", "HEAD"], response_model=None)
async def get_health(request: Request) -> dict | JSONResponse:
    health: HealthProbe = request.app.state.health
    if await health():
        return {"status": "SERVING"}
    return JSONResponse({"status": "NOT_SERVING"}, status_code=503)
