"""The gateway's core, shared by every front door (gRPC ``GatewayService`` and the HTTP API).

A front door turns its wire format into a public ``gateway_pb2.GenerateRequest`` plus a ``Call`` (who is
calling, how long they will wait, the request id) and gets back public ``GenerateResponse`` events, or an
``OmnigateError`` that it maps to its own status (gRPC status, HTTP code). Validation, media ingestion,
calling a worker and the request metrics happen here once, whatever door a request came through.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from omnigate import status
from omnigate.conversation import GenerationMode, Modality, ModelInfo
from omnigate.errors import InvalidInput
from omnigate.gateway.v1 import gateway_pb2
from omnigate_gateway import convert
from omnigate_gateway.auth import Authenticator
from omnigate_gateway.ingest import MediaIngestor
from omnigate_gateway.metrics import GatewayMetrics
from omnigate_gateway.settings import GatewaySettings
from omnigate_gateway.worker_client import WorkerClient

MODE_OUTPUT = {
    GenerationMode.TEXT: Modality.TEXT,
    GenerationMode.AUDIO: Modality.AUDIO,
    GenerationMode.IMAGE: Modality.IMAGE,
}


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Call:
    """What a front door knows about one call besides the request itself."""

    rpc: str  # "Generate" or "GetModelInfo" (metrics label; HTTP routes map onto these)
    request_id: str = field(default_factory=new_request_id)
    time_remaining_s: float | None = None  # the caller's deadline, None when it set none
    api_key: str | None = None  # credential presented by the caller (checked when auth is configured)
    metadata: dict[str, str] = field(default_factory=dict)  # lower-case keys (trace context, etc.)
    protocol: str = "grpc"  # "grpc" or "http"


class GatewayCore:
    def __init__(
        self,
        settings: GatewaySettings,
        worker: WorkerClient,
        ingestor: MediaIngestor,
        metrics: GatewayMetrics,
        auth: Authenticator,
    ) -> None:
        self.auth = auth
        self.settings = settings
        self.worker = worker
        self.ingestor = ingestor
        self.metrics = metrics

    def model_info(self) -> ModelInfo:
        """The served model's info; Unavailable when no worker is ready."""
        return self.worker.require_info()

    def public_model_info(self, call: Call) -> gateway_pb2.GetModelInfoResponse:
        code = grpc.StatusCode.OK
        try:
            self.auth.authenticate(call)
            info = self.worker.require_info()
            s = self.settings
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
        except Exception as exc:
            code = status.to_status(exc).code
            raise
        finally:
            self.metrics.requests.labels(call.rpc, code.name, "none").inc()

    async def generate(
        self, request: gateway_pb2.GenerateRequest, call: Call
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Serves one Generate request; raises an OmnigateError (or another exception = internal)."""
        started = time.monotonic()
        mode = "unknown"
        code = grpc.StatusCode.OK
        first_output = False
        self.metrics.in_flight.inc()
        try:
            async with self.auth.admit(call):
                incoming = convert.parse_request(
                    request, self.settings.default_max_new_tokens, self.settings.default_video_fps
                )
                generation = incoming.request
                mode = generation.mode.value
                info = self.worker.require_info()
                if info.max_new_tokens and generation.params.max_new_tokens > info.max_new_tokens:
                    raise InvalidInput(
                        f"max_new_tokens is {generation.params.max_new_tokens}; the limit is {info.max_new_tokens}"
                    )
                if MODE_OUTPUT[generation.mode] not in info.output_modalities:
                    raise InvalidInput(
                        f"the model {info.model_id} cannot generate {MODE_OUTPUT[generation.mode].value}; it generates "
                        f"{', '.join(m.value for m in info.output_modalities)}"
                    )
                self.ingestor.check(incoming, info)
                deadline = time.monotonic() + (call.time_remaining_s or self.settings.default_timeout_s)
                await self.ingestor.resolve(incoming, info, deadline)
                media_s = time.monotonic() - started
                generation.request_id = call.request_id
                timeout = max(0.001, deadline - time.monotonic())
                timings = gateway_pb2.Timings(media_s=media_s)
                worker_call = self.worker.generate(generation, timeout)
                try:
                    async for event in worker_call:
                        if event.WhichOneof("event") == "summary":
                            timings.total_s = time.monotonic() - started
                            self.metrics.generated_tokens.inc(event.summary.output_tokens)
                        elif not first_output:
                            first_output = True
                            self.metrics.time_to_first_output.labels(mode).observe(time.monotonic() - started)
                        yield convert.public_event(event, timings, info.model_id)
                except grpc.RpcError as exc:
                    raise status.from_rpc_error(exc, upstream=f"the worker at {self.worker.target}") from exc
                finally:
                    worker_call.cancel()  # no-op when finished; stops the worker when our client went away
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = status.to_status(exc).code
            raise
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(call.rpc, code.name, mode).inc()
            self.metrics.request_latency.labels(mode).observe(time.monotonic() - started)
