"""What both services' gRPC servers share: health, reflection and binding."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def finish_server(
    server: grpc.aio.Server,
    service_name: str,
    health_servicer: health.aio.HealthServicer,
    *,
    enable_reflection: bool,
    host: str,
    port: int,
) -> int:
    """Adds grpc.health.v1 (and reflection when enabled) and binds ``host:port``; returns the bound port."""
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if enable_reflection:
        reflection.enable_server_reflection([service_name, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    return bound
