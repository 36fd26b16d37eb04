"""The gateway's public gRPC server: GatewayService, grpc.health.v1 and reflection."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
from grpc_health.v1 import health

from omnigate import status
from omnigate.conversation import GenerationMode, Modality
from omnigate.errors import InvalidInput
from omnigate.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from omnigate.grpc_server import finish_server
from omnigate_gateway import convert
from omnigate_gateway.ingest import MediaIngestor
from omnigate_gateway.metrics import GatewayMetrics
from omnigate_gateway.settings import GatewaySettings
from omnigate_gateway.worker_client import WorkerClient

log = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
MODE_OUTPUT = {
    GenerationMode.TEXT: Modality.TEXT,
    GenerationMode.AUDIO: Modality.AUDIO,
    GenerationMode.IMAGE: Modality.IMAGE,
}


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(
        self,
        settings: GatewaySettings,
        worker: WorkerClient,
        ingestor: MediaIngestor,
        metrics: GatewayMetrics,
    ) -> None:
        self._settings = settings
        self._worker = worker
        self._ingestor = ingestor
        self._metrics = metrics

    async def GetModelInfo(self, request, context):  # noqa: N802 - gRPC method name
        code = grpc.StatusCode.OK
        try:
            info = self._worker.require_info()
            s = self._settings
            max_new_tokens = min(info.max_new_tokens or s.default_max_new_tokens, 2**31)
            limits = gateway_pb2.Limits(
                max_new_tokens=max_new_tokens,
                max_media_items=s.max_media_items,
                max_media_bytes=s.max_media_bytes,
                max_audio_seconds=s.max_audio_duration_s,
                max_video_seconds=s.max_video_duration_s,
                max_video_frames=s.max_video_frames,
                max_image_pixels=s.max_image_pixels,
                default_video_fps=s.default_video_fps,
            )
            return convert.model_info_to_public(info, limits)
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            code = status.to_status(exc).code
            await status.abort(context, exc)
        finally:
            self._metrics.requests.labels("GetModelInfo", code.name, "none").inc()

    async def Generate(self, request, context):  # noqa: N802 - gRPC method name
        started = time.monotonic()
        mode = "unknown"
        code = grpc.StatusCode.OK
        first_output = False
        self._metrics.in_flight.inc()
        try:
            incoming = convert.parse_request(
                request, self._settings.default_max_new_tokens, self._settings.default_video_fps
            )
            generation = incoming.request
            mode = generation.mode.value
            info = self._worker.require_info()
            if info.max_new_tokens and generation.params.max_new_tokens > info.max_new_tokens:
                raise InvalidInput(
                    f"max_new_tokens is {generation.params.max_new_tokens}; the limit is {info.max_new_tokens}"
                )
            if MODE_OUTPUT[generation.mode] not in info.output_modalities:
                raise InvalidInput(
                    f"the model {info.model_id} cannot generate {MODE_OUTPUT[generation.mode].value}; it generates "
                    f"{', '.join(m.value for m in info.output_modalities)}"
                )
            self._ingestor.check(incoming, info)
            deadline = time.monotonic() + (context.time_remaining() or self._settings.default_timeout_s)
            await self._ingestor.resolve(incoming, info, deadline)
            media_s = time.monotonic() - started
            generation.request_id = uuid.uuid4().hex
            timeout = max(0.001, deadline - time.monotonic())
            timings = gateway_pb2.Timings(media_s=media_s)
            call = self._worker.generate(generation, timeout)
            try:
                async for event in call:
                    if event.WhichOneof("event") == "summary":
                        timings.total_s = time.monotonic() - started
                        self._metrics.generated_tokens.inc(event.summary.output_tokens)
                    elif not first_output:
                        first_output = True
                        self._metrics.time_to_first_output.labels(mode).observe(time.monotonic() - started)
                    yield convert.public_event(event, timings, info.model_id)
            except grpc.RpcError as exc:
                raise status.from_rpc_error(exc, upstream=f"the worker at {self._worker.target}") from exc
            finally:
                call.cancel()  # no-op when finished; stops the worker when our client went away
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            code = status.to_status(exc).code
            await status.abort(context, exc)
        finally:
            self._metrics.in_flight.dec()
            self._metrics.requests.labels("Generate", code.name, mode).inc()
            self._metrics.request_latency.labels(mode).observe(time.monotonic() - started)


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
