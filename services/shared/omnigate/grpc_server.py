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
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Adds grpc.health.v1 (and reflection when enabled) and binds ``host:port``; returns the bound port.

    With ``credentials`` (``omnigate.tls.server_credentials``) the port speaks TLS only, else plaintext.
    """
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if enable_reflection:
        reflection.enable_server_reflection([service_name, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
    if credentials is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    return bound


async def start_health_server(
    health_servicer: health.aio.HealthServicer, host: str, port: int
) -> tuple[grpc.aio.Server | None, int | None]:
    """Starts a plaintext server answering only grpc.health.v1 on ``host:port`` (-1 = none).

    Kubernetes' gRPC probes cannot speak TLS: when the main port does, the probes use this one. It shares
    the main server's health servicer, so draining shows here too; it serves nothing else.
    """
    if port < 0:
        return None, None
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind the health port {host}:{port}")
    await server.start()
    return server, bound
