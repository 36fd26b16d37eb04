"""The gateway's core, shared by every front door (gRPC ``GatewayService`` and the HTTP API).

A front door turns its wire format into a public ``gateway_pb2.GenerateRequest`` plus a ``Call`` (who is
calling, how long they will wait, the request id) and gets back public ``GenerateResponse`` events, or an
``OmnigateError`` that it maps to its own status (gRPC status, HTTP code). Validation, media ingestion,
calling a worker and the request metrics happen here once, whatever door a request came through.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import grpc

from omnigate import status, tracing
from omnigate.conversation import GenerationRequest, ModelInfo
from omnigate.errors import InvalidInput
from omnigate.gateway.v1 import gateway_pb2
from omnigate.grpc_server import Undecodable
from omnigate.validation import RequestLimits
from omnigate_gateway import convert
from omnigate_gateway.auth import Authenticator
from omnigate_gateway.media.ingest import MediaIngestor
from omnigate_gateway.metrics import GatewayMetrics
from omnigate_gateway.observation import GenerateObservation, ModelInfoObservation
from omnigate_gateway.settings import GatewaySettings
from omnigate_gateway.workers.pool import WorkerPool

WAIT_MARGIN_S = 0.5  # a request waiting for a worker is refused this long before its deadline


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(value: str | None) -> str:
    """The caller's request id (``x-request-id``) when it is usable (1-128 characters of
    ``[A-Za-z0-9._-]``), else a new one: a request id never carries what a caller could inject into logs."""
    return tracing.sane_request_id(value) or new_request_id()


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
        worker: WorkerPool,
        ingestor: MediaIngestor,
        metrics: GatewayMetrics,
        auth: Authenticator,
    ) -> None:
        self.auth = auth
        self.settings = settings
        self.worker = worker
        self.ingestor = ingestor
        self.metrics = metrics
        self.request_limits = RequestLimits(settings.max_messages, settings.max_content_parts)

    def model_info(self) -> ModelInfo:
        """The served model's info; Unavailable when no worker is ready."""
        return self.worker.require_info()

    def public_model_info(self, call: Call) -> gateway_pb2.GetModelInfoResponse:
        """Serves one GetModelInfo call, inside its own span and with one access line, like Generate."""
        with ModelInfoObservation(call, self.metrics):
            return self._public_model_info(call)

    def _public_model_info(self, call: Call) -> gateway_pb2.GetModelInfoResponse:
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

    async def generate(
        self, request: gateway_pb2.GenerateRequest | Undecodable, call: Call
    ) -> AsyncGenerator[gateway_pb2.GenerateResponse, None]:
        """Serves one Generate request; raises an OmnigateError (or another exception = internal).

        The request runs inside its trace span (``gateway.generate``, continuing a caller's W3C trace
        context) with its request id bound for logs; ``observation.GenerateObservation`` records its metrics
        and its access line around this path.
        """
        with GenerateObservation(call, self.metrics, request) as observed:
            started = observed.started
            async with self.auth.admit(call):
                observed.admitted()
                if isinstance(request, Undecodable):
                    raise InvalidInput(request.message)
                incoming = convert.parse_request(
                    request,
                    self.settings.default_max_new_tokens,
                    self.settings.default_video_fps,
                    self.request_limits,
                )
                generation = incoming.request
                observed.parsed(generation.mode.value)  # admitted demand from here on
                deadline = time.monotonic() + (call.time_remaining_s or self.settings.default_timeout_s)
                info = await self._ready_model(deadline)
                check_against_model(generation, info)
                self.ingestor.check(incoming, info)
                await self.ingestor.resolve(incoming, info, deadline)
                timings = gateway_pb2.Timings(media_s=time.monotonic() - started)
                generation.request_id = call.request_id
                timeout = max(0.001, deadline - time.monotonic())
                target = "a worker"
                try:
                    with observed.worker_call(call.request_id) as metadata:
                        # The pool picks the least busy ready worker, and tries another one when an attempt
                        # fails retriably before any event reached the client (workers/).
                        worker_call = self.worker.generate(generation, timeout, metadata=metadata)
                        try:
                            async for event in worker_call:
                                target = worker_call.target
                                if event.WhichOneof("event") == "summary":
                                    timings.total_s = time.monotonic() - started
                                public = convert.public_event(event, timings, info.model_id)
                                observed.event(public)
                                yield public
                        finally:
                            target = worker_call.target
                            worker_call.cancel()  # no-op when finished; stops the worker when our client left
                except grpc.RpcError as exc:
                    raise status.from_rpc_error(exc, upstream=f"the worker at {target}") from exc

    async def _ready_model(self, deadline: float) -> ModelInfo:
        """The served model's info; while no worker is ready (a cold start), waits for one up to
        ``wait_for_worker_s`` and never past the request's deadline (less ``WAIT_MARGIN_S``, so that the
        caller gets the refusal and its retry delay rather than its own deadline)."""
        s = self.settings
        wait_s = min(s.wait_for_worker_s, deadline - time.monotonic() - WAIT_MARGIN_S)
        return await self.worker.wait_for_info(max(0.0, wait_s), s.no_worker_retry_after_s)


def check_against_model(generation: GenerationRequest, info: ModelInfo) -> None:
    """The checks only the served model can answer: its token limit and its output modalities."""
    if info.max_new_tokens and generation.params.max_new_tokens > info.max_new_tokens:
        raise InvalidInput(
            f"max_new_tokens is {generation.params.max_new_tokens}; it must be between 1 and {info.max_new_tokens}"
        )
    if generation.mode.output not in info.output_modalities:
        raise InvalidInput(
            f"the model {info.model_id} cannot generate {generation.mode.output.value}; it generates "
            f"{', '.join(m.value for m in info.output_modalities)}"
        )
