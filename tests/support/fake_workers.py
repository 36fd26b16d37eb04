"""Fakes of the gateway's worker pool (``workers.pool.WorkerPool``) and of one call to it
(``workers.call.PoolCall``), named as fakes: for tests about the gateway's control flow (its core and its
front doors) without a worker process. The real pool is tested in tests/gateway/test_pool.py and the real
stack in tests/integration/."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from omnigate.conversation import GenerationRequest, Modality, ModelInfo
from omnigate.errors import Unavailable
from omnigate.worker.v1 import worker_pb2 as wk

TEXT_MODEL = ModelInfo(
    "fake/text-model", "FakeForCausalLM", [Modality.TEXT], [Modality.TEXT], max_new_tokens=512
)
# A model that hears and speaks, with two voices (as Qwen2.5-Omni: 16 kHz in, 24 kHz out).
SPEAKING_MODEL = ModelInfo(
    "fake/omni",
    "FakeOmni",
    [Modality.TEXT, Modality.AUDIO],
    [Modality.TEXT, Modality.AUDIO],
    input_audio_sample_rate=16000,
    output_audio_sample_rate=24000,
    speakers=["Chelsie", "Ethan"],
    max_new_tokens=512,
)


def summary(tokens: int) -> wk.GenerateResponse:
    return wk.GenerateResponse(
        summary=wk.Summary(finish_reason=wk.FINISH_REASON_LENGTH, output_tokens=tokens)
    )


def text(delta: str) -> wk.GenerateResponse:
    return wk.GenerateResponse(text=wk.TextDelta(text=delta))


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@dataclass
class FakeWorkerCall:
    """A fake of ``workers.call.PoolCall``: plays ``events`` (an exception in the list is raised there)."""

    events: list
    target: str = "fake-worker:50061"
    cancelled: bool = False
    read: int = 0

    def __aiter__(self) -> FakeWorkerCall:
        return self

    async def __anext__(self) -> wk.GenerateResponse:
        if self.read == len(self.events):
            raise StopAsyncIteration
        event = self.events[self.read]
        self.read += 1
        if isinstance(event, BaseException):
            raise event
        return event

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeWorkerPool:
    """A fake of ``workers.pool.WorkerPool``: one model, calls that play scripted events, and a record of
    what the core sent."""

    info: ModelInfo | None = field(default_factory=lambda: TEXT_MODEL)
    events: list = field(default_factory=lambda: [text("Hel"), text("lo"), summary(2)])
    calls: list[tuple[GenerationRequest, float | None, list]] = field(default_factory=list)
    started: list[FakeWorkerCall] = field(default_factory=list)

    def require_info(self) -> ModelInfo:
        if self.info is None:
            raise Unavailable("no worker is ready (fake pool)")
        return self.info

    async def wait_for_info(self, timeout_s: float, retry_after_s: float) -> ModelInfo:
        """No waiting: the fake pool's readiness never changes by itself."""
        if self.info is None:
            raise Unavailable("no worker is ready (fake pool)", retry_after_s=retry_after_s)
        return self.info

    def generate(self, request: GenerationRequest, timeout_s: float | None, metadata=None) -> FakeWorkerCall:
        self.calls.append((request, timeout_s, list(metadata or [])))
        call = FakeWorkerCall(list(self.events))
        self.started.append(call)
        return call


def core_over(pool: FakeWorkerPool, registry, settings=None):  # type: ignore[no-untyped-def]
    """A real ``GatewayCore`` (real auth, media ingestion and metrics on ``registry``) over the fake pool."""
    from omnigate_gateway.auth import Authenticator
    from omnigate_gateway.core import GatewayCore
    from omnigate_gateway.media.fetch import MediaFetcher
    from omnigate_gateway.media.ingest import MediaIngestor
    from omnigate_gateway.metrics import GatewayMetrics
    from omnigate_gateway.settings import GatewaySettings

    settings = settings or GatewaySettings()
    metrics = GatewayMetrics(registry)
    ingestor = MediaIngestor(MediaFetcher(settings.fetch_limits()), settings, metrics)
    return GatewayCore(settings, pool, ingestor, metrics, Authenticator(settings, metrics))  # type: ignore[arg-type]
