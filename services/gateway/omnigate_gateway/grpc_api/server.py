"""The gateway's public gRPC server: GatewayService, grpc.health.v1 and reflection (Converse is served by
``converse.py``)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grpc
from grpc_health.v1 import health

from omnigate import status, tls, tracing
from omnigate.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from omnigate.grpc_server import add_service, finish_server
from omnigate_gateway.auth import credential
from omnigate_gateway.core import Call, GatewayCore, request_id_from
from omnigate_gateway.grpc_api.converse import converse
from omnigate_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """gRPC front door onto ``GatewayCore``: builds the ``Call`` and maps errors to gRPC statuses."""

    def __init__(self, core: GatewayCore) -> None:
        self._core = core

    @staticmethod
    def _call(rpc: str, context: grpc.aio.ServicerContext[Any, Any]) -> Call:
        metadata = {
            key.lower(): value
            for key, value in (context.invocation_metadata() or ())
            if isinstance(value, str)
        }
        # The credential travels as Call.api_key only, never in metadata (which may be logged or passed on).
        api_key = credential(metadata.pop("authorization", None), metadata.pop("x-api-key", None))
        return Call(
            rpc=rpc,
            request_id=request_id_from(metadata.get(tracing.REQUEST_ID_METADATA)),
            time_remaining_s=context.time_remaining(),
            api_key=api_key,
            metadata=metadata,
            protocol="grpc",
        )

    async def GetModelInfo(self, request, context):  # noqa: N802 - gRPC method name
        call = self._call("GetModelInfo", context)
        await _send_request_id(context, call)
        with tracing.activate(request_id=call.request_id):
            try:
                return self._core.public_model_info(call)
            except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
                await status.abort(context, exc)

    async def Generate(self, request, context):  # noqa: N802 - gRPC method name
        call = self._call("Generate", context)
        await _send_request_id(context, call)
        with tracing.activate(request_id=call.request_id):  # this RPC's task: its error log lines too
            try:
                async for event in self._core.generate(request, call):
                    yield event
            except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
                await status.abort(context, exc, ((tracing.REQUEST_ID_METADATA, call.request_id),))

    async def Converse(self, request_iterator, context):  # noqa: N802 - gRPC method name
        # Each answer is a Generate call with the gateway's default timeout; the call's own deadline (gRPC
        # enforces it) bounds the whole conversation.
        call = dataclasses.replace(self._call("Generate", context), time_remaining_s=None)
        await _send_request_id(context, call)
        with tracing.activate(request_id=call.request_id):
            await converse(self._core, call, request_iterator, context)


async def _send_request_id(context: grpc.aio.ServicerContext[Any, Any], call: Call) -> None:
    """Returns the request id in the initial metadata, before anything else: errors carry it too."""
    await context.send_initial_metadata(((tracing.REQUEST_ID_METADATA, call.request_id),))


def build_server(
    servicer: GatewayServicer, settings: GatewaySettings, health_servicer: health.aio.HealthServicer
) -> tuple[grpc.aio.Server, int]:
    """Creates the server and binds it; returns it with the bound port (not started)."""
    server = grpc.aio.server(options=server_options(settings))
    add_service(server, servicer, gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"])
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


def server_options(settings: GatewaySettings) -> list[tuple[str, int]]:
    """The public server's channel options: message size limits, and connection ageing (gRPC A9): a client
    connection gets a GOAWAY after ``max_connection_age_s`` (gRPC adds +-10 % jitter) and its calls then have
    ``max_connection_age_grace_s`` to finish, so long-lived clients reconnect, through the load balancer, to
    gateways the autoscaler added since."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    if settings.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", round(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", round(settings.max_connection_age_grace_s * 1000)),
        ]
    return options
