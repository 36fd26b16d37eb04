"""The gateway's core, shared by every front door (gRPC ``GatewayService`` and the HTTP API).

A front door turns its wire format into a public ``gateway_pb2.GenerateRequest`` plus a ``Call`` (who is
calling, how long they will wait, the request id) and gets back public ``GenerateResponse`` events, or an
``OmnigateError`` that it maps to its own status (gRPC status, HTTP code). Validation, media ingestion,
calling a worker and the request metrics happen here once, whatever door a request came through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

import grpc

from omnigate import status, tracing
from omnigate.conversation import GenerationMode, Modality, ModelInfo
from omnigate.errors import InvalidInput
from omnigate.gateway.v1 import gateway_pb2
from omnigate.grpc_server import Undecodable
from omnigate.validation import RequestLimits
from omnigate_gateway import convert
from omnigate_gateway.auth import Authenticator
from omnigate_gateway.media.ingest import MediaIngestor
from omnigate_gateway.metrics import GatewayMetrics
from omnigate_gateway.settings import GatewaySettings
from omnigate_gateway.workers.pool import WorkerPool

MODE_OUTPUT = {
    GenerationMode.TEXT: Modality.TEXT,
    GenerationMode.AUDIO: Modality.AUDIO,
    GenerationMode.IMAGE: Modality.IMAGE,
}


access_log = logging.getLogger("omnigate_gateway.access")
REASON_CHARS = 300  # of a refusal's message in its access line


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
        started = time.monotonic()
        span = tracing.tracer(tracing.GATEWAY).start_span(
            "gateway.get_model_info",
            context=tracing.extract(call.metadata),
            kind=tracing.SpanKind.SERVER,
            attributes={"omnigate.request_id": call.request_id, "omnigate.protocol": call.protocol},
        )
        code, reason = grpc.StatusCode.OK, None
        with tracing.activate(span, request_id=call.request_id):
            try:
                return self._public_model_info(call)
            except Exception as exc:
                refusal = status.to_status(exc)
                code, reason = refusal.code, refusal.details
                raise
            finally:
                self.metrics.requests.labels(call.rpc, code.name, "none").inc()
                _log_access(call, code.name, "none", time.monotonic() - started, 0, reason)
                tracing.end_span(span, code.name)

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
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Serves one Generate request; raises an OmnigateError (or another exception = internal).

        The request runs inside its trace span (``gateway.generate``, continuing a caller's W3C trace
        context) with its request id bound for logs, and one access line is logged when it ends.
        """
        started = time.monotonic()
        tracer = tracing.tracer(tracing.GATEWAY)
        span = tracer.start_span(
            "gateway.generate",
            context=tracing.extract(call.metadata),
            kind=tracing.SpanKind.SERVER,
            attributes={"omnigate.request_id": call.request_id, "omnigate.protocol": call.protocol},
        )
        code, output_tokens, stream_span, reason = "OK", 0, None, None
        with tracing.activate(span, request_id=call.request_id):
            try:
                async with contextlib.aclosing(self._generate(request, call)) as events:
                    async for event in events:
                        if event.HasField("summary"):
                            output_tokens = event.summary.output_tokens
                        elif stream_span is None:
                            stream_span = tracer.start_span("gateway.stream")  # first output to the end
                        yield event
            except (asyncio.CancelledError, GeneratorExit):
                code = _cancelled_code(call, started).name
                raise
            except Exception as exc:
                refusal = status.to_status(exc)
                code, reason = refusal.code.name, refusal.details
                raise
            finally:
                if stream_span is not None:
                    stream_span.end()
                public_mode = (
                    convert.PUBLIC_MODES.get(request.generation_mode)
                    if isinstance(request, gateway_pb2.GenerateRequest)
                    else None
                )
                mode = public_mode.value if public_mode is not None else "unknown"
                _log_access(call, code, mode, time.monotonic() - started, output_tokens, reason)
                span.set_attribute("omnigate.mode", mode)
                tracing.end_span(span, code)

    async def _generate(
        self, request: gateway_pb2.GenerateRequest | Undecodable, call: Call
    ) -> AsyncGenerator[gateway_pb2.GenerateResponse, None]:
        started = time.monotonic()
        mode = "unknown"
        code = grpc.StatusCode.OK
        first_output = False
        first_token = first_audio = False
        admitted = reached_worker = False  # for the rejected counter (admission counts its own refusals)
        self.metrics.in_flight.inc()
        try:
            async with self.auth.admit(call):
                admitted = True
                if isinstance(request, Undecodable):
                    raise InvalidInput(request.message)
                incoming = convert.parse_request(
                    request,
                    self.settings.default_max_new_tokens,
                    self.settings.default_video_fps,
                    self.request_limits,
                )
                generation = incoming.request
                mode = generation.mode.value
                info = self.worker.require_info()
                if info.max_new_tokens and generation.params.max_new_tokens > info.max_new_tokens:
                    raise InvalidInput(
                        f"max_new_tokens is {generation.params.max_new_tokens}; it must be between 1 and "
                        f"{info.max_new_tokens}"
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
                reached_worker = True
                worker_span = tracing.tracer(tracing.GATEWAY).start_span(
                    "gateway.worker", kind=tracing.SpanKind.CLIENT
                )  # the worker's spans are its children: its context travels in the call's metadata
                # The pool picks the least busy ready worker, and tries another one when an attempt fails
                # retriably before any event reached the client (worker_client.py).
                worker_call = self.worker.generate(
                    generation,
                    timeout,
                    metadata=[*tracing.inject(worker_span), (tracing.REQUEST_ID_METADATA, call.request_id)],
                )
                try:
                    async for event in worker_call:
                        if event.WhichOneof("event") == "summary":
                            timings.total_s = time.monotonic() - started
                            self.metrics.generated_tokens.inc(event.summary.output_tokens)
                        elif not first_output:
                            first_output = True
                            self.metrics.time_to_first_output.labels(mode).observe(time.monotonic() - started)
                        if not first_token and event.HasField("text"):
                            first_token = True
                            self.metrics.time_to_first_token.labels(mode).observe(time.monotonic() - started)
                        elif not first_audio and event.HasField("audio"):
                            first_audio = True
                            self.metrics.time_to_first_audio.observe(time.monotonic() - started)
                        yield convert.public_event(event, timings, info.model_id)
                except grpc.RpcError as exc:
                    tracing.set_grpc_code(worker_span, exc.code().name, client=True)
                    self.metrics.upstream_errors.labels(exc.code().name).inc()
                    raise status.from_rpc_error(exc, upstream=f"the worker at {worker_call.target}") from exc
                finally:
                    worker_call.cancel()  # no-op when finished; stops the worker when our client went away
                    worker_span.end()
        except (asyncio.CancelledError, GeneratorExit):
            code = _cancelled_code(call, started)
            raise
        except Exception as exc:
            code = status.to_status(exc).code
            if admitted and not reached_worker:
                self.metrics.count_rejection(code.name)
            raise
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(call.rpc, code.name, mode).inc()
            self.metrics.request_latency.labels(mode).observe(time.monotonic() - started)


def _cancelled_code(call: Call, started: float) -> grpc.StatusCode:
    """The status of a request that ended by cancellation: DEADLINE_EXCEEDED when the caller's deadline
    passed (its timer started a little before ours: 0.1 s of slack), else CANCELLED (the caller left)."""
    expired = call.time_remaining_s is not None and time.monotonic() - started >= call.time_remaining_s - 0.1
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


def _log_access(
    call: Call, code: str, mode: str, duration_s: float, output_tokens: int, reason: str | None = None
) -> None:
    """The one access line of a call (both RPCs, every front door); a refused or failed call's line says
    why (the status message the caller got, cut to REASON_CHARS)."""
    reason = reason[:REASON_CHARS] if reason else None
    access_log.info(
        "%s %s %s mode=%s duration_s=%.3f output_tokens=%d%s",
        call.rpc,
        code,
        call.protocol,
        mode,
        duration_s,
        output_tokens,
        f" reason={reason!r}" if reason else "",
        extra={
            "rpc": call.rpc,
            "code": code,
            "protocol": call.protocol,
            "mode": mode,
            "duration_s": round(duration_s, 6),
            "output_tokens": output_tokens,
            **({"reason": reason} if reason else {}),
        },
    )
