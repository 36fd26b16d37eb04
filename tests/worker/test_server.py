"""The worker's gRPC server (``server.WorkerServicer``) on its own: the real server, scheduler and observation
(``observation.py``: metrics, access line) on a loopback port chosen by the OS, called through the generated
stubs, with the engine replaced by a fake named as one (``tests.support.fake_engine``: these tests are about
the server's control flow; the real engine has tests/worker/test_engine.py and the real stack
tests/integration/).

The client is grpcio's blocking one, on a thread of its own as a gateway is in a process of its own: the
asyncio client can report a server's refusal that arrives before it finished sending the request as
INTERNAL "Internal error from Core" instead of the server's status (grpc/grpc#36066), which would make these
tests about grpcio's client instead of the worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry

from omnigate import status
from omnigate.conversation import (
    AudioChunk,
    ContentPart,
    FinishReason,
    GenerationMode,
    GenerationParams,
    Modality,
    Summary,
    TextDelta,
)
from omnigate.errors import InvalidInput, LimitExceeded
from omnigate.worker.v1 import worker_pb2 as wk
from omnigate.worker.v1 import worker_pb2_grpc
from omnigate_worker.metrics import WorkerMetrics
from omnigate_worker.observation import REJECTIONS
from omnigate_worker.scheduler import Scheduler
from omnigate_worker.server import WorkerServicer, build_server
from omnigate_worker.settings import WorkerSettings
from tests.support.fake_engine import FAKE_MODEL, HOLD, FakeRecordingEngine
from tests.support.waiting import async_wait_until

REQUESTS = "omnigate_worker_requests_total"
REJECTED = "omnigate_worker_rejected_requests_total"
CANCELLED = "omnigate_worker_cancelled_requests_total"


@dataclass
class RunningWorker:
    """A worker server on a loopback port, with its fake engine, scheduler and private metrics."""

    stub: worker_pb2_grpc.WorkerServiceStub
    engine: FakeRecordingEngine
    scheduler: Scheduler
    settings: WorkerSettings
    registry: CollectorRegistry

    def counts(self, name: str) -> dict[tuple[str, ...], float]:
        """The samples of counter ``name`` that are not 0, by their label values."""
        return {
            tuple(sample.labels.values()): sample.value
            for metric in self.registry.collect()
            for sample in metric.samples
            if sample.name == name and sample.value
        }

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def finished(self, calls: int = 1) -> dict[tuple[str, ...], float]:
        """requests_total by (code, mode), once ``calls`` calls were counted (a call's status reaches the
        client before the server's observation of it ends)."""
        await async_wait_until(
            lambda: sum(self.counts(REQUESTS).values()) >= calls, what=f"{calls} call(s) to be counted"
        )
        return self.counts(REQUESTS)

    async def generate(self, *stream: wk.GenerateRequest, timeout: float | None = None) -> list:
        """One Generate call sending ``stream``, from a client thread: its responses (or its RpcError)."""
        return await asyncio.to_thread(lambda: list(self.stub.Generate(iter(stream), timeout=timeout)))

    async def refusal(self, *stream: wk.GenerateRequest, timeout: float | None = None) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as raised:
            await self.generate(*stream, timeout=timeout)
        return raised.value


@pytest.fixture
async def start_worker() -> AsyncIterator[Callable[..., Awaitable[RunningWorker]]]:
    """Starts a worker server; ``attach=False`` leaves it without an engine (still loading its model)."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(attach: bool = True, **overrides) -> RunningWorker:
            settings = WorkerSettings(
                model="fake", port=0, metrics_port=-1, reflection=False, max_batch_wait_ms=0, **overrides
            )
            registry = CollectorRegistry()
            metrics = WorkerMetrics(registry)
            engine = FakeRecordingEngine()
            scheduler = Scheduler(engine, settings, metrics)
            scheduler.start()
            stack.callback(scheduler.shutdown)
            stack.callback(engine.hold.set)  # runs first: a held run lets the engine thread stop
            servicer = WorkerServicer(settings, metrics)
            if attach:
                servicer.attach(engine, scheduler)
            server, port = build_server(servicer, settings, health.aio.HealthServicer())
            await server.start()
            stack.push_async_callback(server.stop, None)
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            stack.callback(channel.close)
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            return RunningWorker(stub, engine, scheduler, settings, registry)

        yield start


@pytest.fixture
async def worker(start_worker) -> RunningWorker:
    return await start_worker()


def _spec(*parts: wk.ContentPart, mode=wk.GENERATION_MODE_TEXT, **fields) -> wk.GenerateRequest:
    return wk.GenerateRequest(
        spec=wk.GenerateSpec(
            messages=[wk.Message(role="user", content=list(parts))],
            generation_mode=mode,
            parameters=fields.pop("parameters", wk.GenerationParameters(max_new_tokens=8)),
            **fields,
        )
    )


def _text(text: str) -> wk.ContentPart:
    return wk.ContentPart(text=text)


def _chunk(media_id: int, data: bytes) -> wk.GenerateRequest:
    return wk.GenerateRequest(media_chunk=wk.MediaChunk(media_id=media_id, data=data))


async def test_the_spec_and_its_media_chunks_reach_the_engine_as_one_plain_request(worker):
    """An audio clip in three chunks and an image in two, interleaved, after the spec: the engine gets the
    samples and pixels as sent, and the spec's parameters, mode, speaker and request id."""
    samples = np.random.default_rng(7).uniform(-1, 1, 4000).astype(np.float32)
    pixels = np.random.default_rng(8).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    audio, image = samples.astype("<f4").tobytes(), pixels.tobytes()
    spec = _spec(
        wk.ContentPart(audio=wk.AudioRef(media_id=1, sample_rate=16000, num_samples=len(samples))),
        _text("clip:12"),
        wk.ContentPart(image=wk.ImageRef(media_id=2, width=5, height=6)),
        parameters=wk.GenerationParameters(
            max_new_tokens=8, do_sample=True, temperature=0.5, top_p=0.75, top_k=20, seed=7, stop=["END"]
        ),
        request_id="req-server-1",
        speaker="FakeSpeakerB",
        return_full_text=True,
    )
    stream = [
        spec,
        _chunk(1, audio[:5000]),
        _chunk(2, image[:40]),
        _chunk(1, audio[5000:11000]),
        _chunk(2, image[40:]),
        _chunk(1, audio[11000:]),
    ]

    responses = await worker.generate(*stream)

    [request] = worker.engine.requests
    [[clip, text, picture]] = [message.content for message in request.messages]
    assert request.messages[0].role == "user"
    assert clip.type is Modality.AUDIO and clip.audio.sample_rate == 16000
    assert clip.audio.samples.dtype == np.float32 and np.array_equal(clip.audio.samples, samples)
    assert text == ContentPart(Modality.TEXT, text="clip:12")
    assert picture.type is Modality.IMAGE and np.array_equal(picture.image.pixels, pixels)
    assert request.params == GenerationParams(
        max_new_tokens=8, do_sample=True, temperature=0.5, top_p=0.75, top_k=20, seed=7, stop=["END"]
    )
    assert request.mode is GenerationMode.TEXT
    assert (request.request_id, request.speaker, request.return_full_text) == (
        "req-server-1",
        "FakeSpeakerB",
        True,
    )
    assert worker.engine.log[0] == ("join", "clip")  # a text request: it decoded in the batch
    assert [r.WhichOneof("event") for r in responses] == ["summary"]
    assert await worker.finished() == {("OK", "text"): 1}


async def test_events_stream_back_in_order_with_the_summary_last(worker, caplog):
    speech = np.linspace(-0.5, 0.5, 480, dtype=np.float32)
    worker.engine.script = [
        TextDelta("Hel"),
        AudioChunk(speech, 24000, 0),
        TextDelta("lo"),
        Summary(FinishReason.LENGTH, prompt_tokens=5, output_tokens=2, audio_seconds=0.02),
    ]
    with caplog.at_level(logging.INFO, logger="omnigate_worker.access"):
        responses = await worker.generate(_spec(_text("speak"), mode=wk.GENERATION_MODE_AUDIO))
        requests = await worker.finished()  # and its access line written

    assert [r.WhichOneof("event") for r in responses] == ["text", "audio", "text", "summary"]
    assert (responses[0].text.text, responses[2].text.text) == ("Hel", "lo")
    audio = responses[1].audio
    assert (audio.sample_rate, audio.sequence) == (24000, 0)
    assert audio.pcm_s16le == (speech * 32767.0).astype("<i2").tobytes()
    summary = responses[3].summary
    assert summary.finish_reason == wk.FINISH_REASON_LENGTH
    assert (summary.prompt_tokens, summary.output_tokens) == (5, 2)
    assert summary.audio_seconds == pytest.approx(0.02)
    assert summary.queue_s >= 0
    assert worker.engine.log == [("alone", "speak")]
    assert requests == {("OK", "audio"): 1}
    assert worker.value("omnigate_worker_generated_tokens_total") == 2
    assert worker.value("omnigate_worker_prompt_tokens_total") == 5
    assert worker.value("omnigate_worker_time_to_first_token_seconds_count", mode="audio") == 1
    assert worker.value("omnigate_worker_time_to_first_audio_seconds_count") == 1
    assert worker.value("omnigate_worker_requests_in_flight") == 0
    assert worker.counts(REJECTED) == {} and worker.counts(CANCELLED) == {}
    [line] = [r for r in caplog.records if r.name == "omnigate_worker.access"]
    assert (line.code, line.mode, line.prompt_tokens, line.output_tokens) == ("OK", "audio", 5, 2)


@pytest.mark.parametrize(
    ("stream", "message", "mode"),
    [
        ([_chunk(1, b"\0" * 4), _spec(_text("late"))], "before the spec", "unknown"),
        ([_spec(_text("text only")), _chunk(7, b"\0" * 4)], "undeclared media_id 7", "unknown"),
        (
            [_spec(_text("no mode"), mode=wk.GENERATION_MODE_UNSPECIFIED)],
            "unknown generation_mode 0",
            "unknown",
        ),
        ([_spec(_text("future mode"), mode=99)], "unknown generation_mode 99", "unknown"),
        (
            [_spec(_text("hot"), parameters=wk.GenerationParameters(max_new_tokens=8, temperature=500))],
            "temperature is 500.0; it must be 0 \\(greedy\\) or between",
            "text",
        ),
        (
            [_spec(_text("too many"), parameters=wk.GenerationParameters(max_new_tokens=5000))],
            "max_new_tokens is 5000; it must be an integer between 1 and 4096",
            "text",
        ),
        (
            [_spec(_text("draw"), mode=wk.GENERATION_MODE_IMAGE)],
            "the fake model cannot generate image",
            "image",
        ),
    ],
    ids=[
        "chunk-before-spec",
        "chunk-for-unknown-media",
        "unspecified-mode",
        "unknown-mode",
        "temperature-out-of-range",
        "max-new-tokens-over-limit",
        "mode-the-model-lacks",
    ],
)
async def test_a_malformed_request_is_invalid_argument_and_never_reaches_the_engine(
    worker, stream, message, mode
):
    error = await worker.refusal(*stream)

    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, error.details())
    assert worker.engine.requests == []
    assert worker.counts(REJECTED) == {(REJECTIONS[("request", InvalidInput)],): 1}  # invalid_argument
    assert await worker.finished() == {("INVALID_ARGUMENT", mode): 1}


async def test_media_over_the_limit_is_resource_exhausted_without_a_retry_delay(start_worker):
    worker = await start_worker(max_request_media_bytes=1000)
    spec = _spec(wk.ContentPart(audio=wk.AudioRef(media_id=1, sample_rate=16000, num_samples=1000)))

    error = await worker.refusal(spec, _chunk(1, b"\0" * 4000))

    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "decoded media is 4000 bytes; the limit is 1000 bytes" in error.details()
    assert status.retry_after_s(error) is None  # the same request would be refused again
    assert worker.engine.requests == []
    assert worker.counts(REJECTED) == {(REJECTIONS[("request", LimitExceeded)],): 1}  # too_long
    assert await worker.finished() == {("RESOURCE_EXHAUSTED", "unknown"): 1}


async def test_a_full_queue_is_resource_exhausted_with_a_retry_delay(start_worker):
    """max_queue=1: one request runs (held), one waits; the third is refused, and the first two finish."""
    worker = await start_worker(max_queue=1, queue_retry_after_s=2.5)
    worker.engine.hold.clear()

    def request(name: str) -> wk.GenerateRequest:
        return _spec(_text(name), mode=wk.GENERATION_MODE_AUDIO)

    running = asyncio.ensure_future(worker.generate(request("running")))
    await async_wait_until(lambda: ("alone", "running") in worker.engine.log, what="the first request to run")
    queued = asyncio.ensure_future(worker.generate(request("queued")))
    await async_wait_until(lambda: len(worker.engine.requests) == 2, what="the second request to be queued")

    error = await worker.refusal(request("refused"))
    worker.engine.hold.set()
    answered = await asyncio.gather(running, queued)

    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full (1 requests waiting)" in error.details()
    assert status.retry_after_s(error) == 2.5
    assert [[r.WhichOneof("event") for r in responses] for responses in answered] == [
        ["summary"],
        ["summary"],
    ]
    assert worker.engine.log == [("alone", "running"), ("alone", "queued")]
    assert worker.counts(REJECTED) == {("queue_full",): 1}
    assert await worker.finished(calls=3) == {("OK", "audio"): 2, ("RESOURCE_EXHAUSTED", "audio"): 1}


async def test_a_worker_still_loading_its_model_is_unavailable(start_worker):
    worker = await start_worker(attach=False)

    error = await worker.refusal(_spec(_text("early")))
    with pytest.raises(grpc.RpcError) as info_error:
        await asyncio.to_thread(worker.stub.GetModelInfo, wk.GetModelInfoRequest())

    assert error.code() is grpc.StatusCode.UNAVAILABLE and "still loading" in error.details()
    assert info_error.value.code() is grpc.StatusCode.UNAVAILABLE
    assert worker.engine.requests == []
    assert worker.counts(REJECTED) == {("not_ready",): 1}
    assert await worker.finished() == {("UNAVAILABLE", "unknown"): 1}  # GetModelInfo is not a Generate


async def test_a_draining_worker_is_unavailable_before_it_reads_the_request(worker):
    worker.scheduler.stop_accepting()

    error = await worker.refusal(_spec(_text("late")))

    assert error.code() is grpc.StatusCode.UNAVAILABLE and "shutting down" in error.details()
    assert worker.engine.requests == []
    assert worker.counts(REJECTED) == {("draining",): 1}
    assert await worker.finished() == {("UNAVAILABLE", "unknown"): 1}  # unknown: its spec was never read


async def test_a_client_cancel_mid_stream_reaches_the_engine_and_is_counted(worker):
    worker.engine.hold.clear()
    worker.engine.script = [TextDelta("Hel"), HOLD, TextDelta("lo"), Summary(FinishReason.STOP, 1, 2)]

    def leave_after_the_first_event() -> wk.GenerateResponse:
        call = worker.stub.Generate(iter([_spec(_text("leaver"), mode=wk.GENERATION_MODE_AUDIO)]))
        first = next(call)
        call.cancel()
        return first

    first = await asyncio.to_thread(leave_after_the_first_event)

    assert first.text.text == "Hel"
    await async_wait_until(lambda: ("cancelled", "leaver") in worker.engine.log, what="the engine to see it")
    assert await worker.finished() == {("CANCELLED", "audio"): 1}
    assert worker.counts(CANCELLED) == {("client",): 1}
    assert worker.counts(REJECTED) == {}
    assert worker.value("omnigate_worker_requests_in_flight") == 0


async def test_a_passed_deadline_is_deadline_exceeded_and_stops_the_engine(worker):
    worker.engine.hold.clear()

    call = asyncio.ensure_future(
        worker.refusal(_spec(_text("slow"), mode=wk.GENERATION_MODE_AUDIO), timeout=1)
    )
    await async_wait_until(lambda: ("alone", "slow") in worker.engine.log, what="the request to run")
    error = await call

    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await async_wait_until(lambda: ("cancelled", "slow") in worker.engine.log, what="the engine to see it")
    assert await worker.finished() == {("DEADLINE_EXCEEDED", "audio"): 1}
    assert worker.counts(CANCELLED) == {("deadline",): 1}


async def test_model_info_reports_the_engines_model_and_the_workers_limits(start_worker):
    worker = await start_worker(max_new_tokens_limit=1000, max_request_media_bytes=123456)

    info = await asyncio.to_thread(worker.stub.GetModelInfo, wk.GetModelInfoRequest())

    assert info == wk.GetModelInfoResponse(
        model_id="fake/omni-model",
        architecture="FakeOmniForConditionalGeneration",
        input_modalities=[wk.MODALITY_TEXT, wk.MODALITY_IMAGE, wk.MODALITY_AUDIO],
        output_modalities=[wk.MODALITY_TEXT, wk.MODALITY_AUDIO],
        input_audio_sample_rate=16000,
        output_audio_sample_rate=24000,
        speakers=["FakeSpeakerA", "FakeSpeakerB"],
        max_new_tokens=1000,
        max_request_media_bytes=123456,
        device="fake:0",
        max_image_pixels=FAKE_MODEL.max_image_pixels,
        max_video_frame_pixels=FAKE_MODEL.max_video_frame_pixels,
        attention="fake-attention",
        decode_runner="fake-runner",
    )
    assert worker.counts(REQUESTS) == {}  # GetModelInfo is not a Generate
