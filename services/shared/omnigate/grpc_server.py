"""What both services' gRPC servers share: health, reflection and binding."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Undecodable:
    """Stands for a request message whose bytes did not parse (or held invalid UTF-8 in a string field).

    grpcio ends a call whose request fails to deserialize with UNKNOWN ("Unexpected <DecodeError>"), a
    code outside the documented ones; ``add_service`` hands the servicer this object instead, and the
    servicer refuses it with INVALID_ARGUMENT like any other malformed request.
    """

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = (
            f"the request is not a valid {type_name} message ({type(error).__name__}: "
            f"{str(error)[:120]}); send a serialized {type_name}, with strings in valid UTF-8"
        )


def _deserializer(message_class: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    type_name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Message | Undecodable:
        try:
            return message_class.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return Undecodable(type_name, exc)

    return deserialize


def add_service(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Registers ``servicer``'s methods for ``service`` as the generated ``add_*Servicer_to_server`` does,
    with deserializers that turn an unparsable request message into ``Undecodable`` (see there)."""
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


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
