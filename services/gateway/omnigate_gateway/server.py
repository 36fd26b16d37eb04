"""The gateway's public gRPC server: GatewayService, grpc.health.v1 and reflection."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health

from omnigate import status
from omnigate.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from omnigate.grpc_server import finish_server
from omnigate_gateway.core import Call, GatewayCore
from omnigate_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """gRPC front door onto ``GatewayCore``: builds the ``Call`` and maps errors to gRPC statuses."""

    def __init__(self, core: GatewayCore) -> None:
        self._core = core

    @staticmethod
    def _call(rpc: str, context) -> Call:
        metadata = {
            key.lower(): value
            for key, value in (context.invocation_metadata() or ())
            if isinstance(value, str)
        }
        return Call(rpc=rpc, time_remaining_s=context.time_remaining(), metadata=metadata, protocol="grpc")

    async def GetModelInfo(self, request, context):  # noqa: N802 - gRPC method name
        try:
            return self._core.public_model_info(self._call("GetModelInfo", context))
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            await status.abort(context, exc)

    async def Generate(self, request, context):  # noqa: N802 - gRPC method name
        call = self._call("Generate", context)
        try:
            async for event in self._core.generate(request, call):
                yield event
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            await status.abort(context, exc)


def build_server(
    servicer: GatewayServicer, settings: GatewaySettings, health_servicer: health.aio.HealthServicer
) -> tuple[grpc.aio.Server, int]:
    """Creates the server and binds it; returns it with the bound port (not started)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
        ]
    )
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
    port = finish_server(
        server,
        SERVICE_NAME,
        health_servicer,
        enable_reflection=settings.reflection,
        host=settings.host,
        port=settings.port,
    )
    return server, port
