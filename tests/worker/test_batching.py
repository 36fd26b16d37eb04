"""The scheduler and continuous batching on the real tiny Qwen2.5-Omni (and fakes where the test is about
control flow only: those are named ``Fake...``)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from omnigate.conversation import (
    ContentPart,
    GenerationMode,
    GenerationParams,
    GenerationRequest,
    Message,
    Modality,
    Summary,
    TextDelta,
)
from omnigate.errors import DeadlineExceeded, InvalidInput, LimitExceeded
from omnigate.media import Audio, Image, Video
from omnigate_worker.engine.base import Prepared
from omnigate_worker.metrics import WorkerMetrics
from omnigate_worker.scheduler import Scheduler
from omnigate_worker.settings import WorkerSettings
from tests.support.stack import MODELS_DIR


def _scheduler(engine, **overrides) -> Scheduler:
    settings = WorkerSettings(model=str(MODELS_DIR / "tiny-qwen2.5-omni"), **overrides)
    scheduler = Scheduler(engine, settings, WorkerMetrics(CollectorRegistry()))
    scheduler.start()
    return scheduler


def _text(t: str) -> ContentPart:
    return ContentPart(Modality.TEXT, text=t)


def _request(parts, max_new_tokens=24, min_new_tokens=0, **kwargs) -> GenerationRequest:
    return GenerationRequest(
        messages=[Message("user", parts)],
        params=GenerationParams(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens),
        **kwargs,
    )


def _bench_set() -> list[GenerationRequest]:
    """The benchmark's mixed request set (text; text+image; text+audio; text+video; video with its track)."""
    rng = np.random.default_rng(0)
    image = Image(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    audio = Audio((0.1 * np.sin(np.arange(48000) * 0.05)).astype(np.float32), 16000)
    track = Audio((0.1 * np.sin(np.arange(64000) * 0.03)).astype(np.float32), 16000)
    video = Video(
        rng.integers(0, 255, (4, 64, 96, 3), dtype=np.uint8), [0, 1, 2, 3], 1.0, 10.0, 4.0, 40, track
    )
    return [
        _request([_text("Tell me a story about a lighthouse.")], 32),
        _request([ContentPart(Modality.IMAGE, image=image), _text("Describe this image.")], 20),
        _request([ContentPart(Modality.AUDIO, audio=audio), _text("What do you hear?")], 28),
        _request([ContentPart(Modality.VIDEO, video=video), _text("Describe this video.")], 16),
        _request(
            [ContentPart(Modality.VIDEO, video=video), _text("Describe this video.")],
            12,
            use_audio_in_video=True,
        ),
    ]


def _unbatched(engine, request) -> tuple[str, Summary]:
    events = []
    engine.generate(request, events.append, threading.Event())
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


async def _collect(job) -> tuple[str, list]:
    events = [event async for event in job.events()]
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events


@pytest.mark.parametrize("runner", ["slots", "dynamic"])
async def test_batched_greedy_outputs_equal_unbatched(runner, engine, dynamic_engine):
    engine = engine if runner == "slots" else dynamic_engine
    requests = _bench_set()
    expected = [_unbatched(engine, r) for r in requests]
    scheduler = _scheduler(engine)
    try:
        jobs = [scheduler.submit(r) for r in requests]
        results = await asyncio.gather(*(_collect(job) for job in jobs))
    finally:
        scheduler.shutdown()
    for (want_text, want_summary), (got_text, events) in zip(expected, results, strict=True):
        assert got_text == want_text
        assert events[-1].output_tokens == want_summary.output_tokens
        assert events[-1].prompt_tokens == want_summary.prompt_tokens


async def test_different_lengths_share_a_batch_and_stream_separately(engine):
    scheduler = _scheduler(engine)
    long = _request([_text("Tell me a long story.")], max_new_tokens=60, min_new_tokens=60)
    short = _request([_text("Hi")], max_new_tokens=4, min_new_tokens=4)
    finished: dict[str, float] = {}
    deltas: dict[str, int] = {"long": 0, "short": 0}

    async def run(name, request):
        async for event in scheduler.submit(request).events():
            if isinstance(event, TextDelta):
                deltas[name] += 1
            if isinstance(event, Summary):
                finished[name] = time.monotonic()
                return event

    try:
        long_task = asyncio.create_task(run("long", long))
        await asyncio.sleep(0.01)
        short_summary = await run("short", short)
        assert "long" not in finished, "the short request finished while the long one was still generating"
        long_summary = await long_task
    finally:
        scheduler.shutdown()
    assert short_summary.output_tokens == 4 and long_summary.output_tokens == 60
    assert deltas["long"] >= 2 and deltas["short"] >= 1
    assert long_summary.finish_reason == "length"


async def test_cancelled_request_leaves_and_its_slot_is_reused(engine):
    scheduler = _scheduler(engine, max_batch_size=2)
    try:
        job = scheduler.submit(_request([_text("Go on")], max_new_tokens=2000, min_new_tokens=2000))
        events = job.events()
        first = await events.__anext__()
        assert isinstance(first, TextDelta)
        job.cancel()
        rest = [event async for event in events]  # the stream ends soon, without a summary
        assert not any(isinstance(e, Summary) for e in rest)
        deadline = time.monotonic() + 5
        while scheduler.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not scheduler.busy(), "the cancelled row left the batch"
        text, follow_up = await _collect(scheduler.submit(_request([_text("Hello")], max_new_tokens=5)))
        assert isinstance(follow_up[-1], Summary) and follow_up[-1].output_tokens <= 5
    finally:
        scheduler.shutdown()


async def test_deadline_expiry_ends_the_request(engine):
    scheduler = _scheduler(engine)
    try:
        job = scheduler.submit(
            _request([_text("Go on")], max_new_tokens=3000, min_new_tokens=3000), timeout_s=0.3
        )
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await _collect(job)
        assert time.monotonic() - started < 3
    finally:
        scheduler.shutdown()


async def test_over_budget_prompt_is_refused_before_it_runs(engine):
    scheduler = _scheduler(engine, max_prompt_tokens=20)
    try:
        with pytest.raises(LimitExceeded, match="limit is 20"):
            await _collect(scheduler.submit(_request([_text("A prompt longer than twenty tokens " * 4)])))
    finally:
        scheduler.shutdown()


async def test_a_speech_requests_thinker_decodes_in_the_text_batch(engine):
    """A spoken answer's thinker is a row of the text batch: a speech request submitted while a text request
    decodes shares decode steps with it (two rows in one thinker step), rather than running on its own.
    (That it starts speaking before the text request finishes: test_speech.py,
    test_text_and_speech_do_not_wait_for_each_other.)"""
    rows_per_step: list[int] = []

    def count_rows(module, args, kwargs):
        # Decode steps feed the thinker's decoder token ids (the prefill feeds it embeddings).
        ids = kwargs.get("input_ids")
        if ids is not None:
            rows_per_step.append(ids.shape[0])

    hook = engine._gen_model.get_decoder().register_forward_pre_hook(count_rows, with_kwargs=True)
    scheduler = _scheduler(engine)
    try:
        text_job = scheduler.submit(_request([_text("Story")], max_new_tokens=20, min_new_tokens=20))
        text_events = text_job.events()
        assert isinstance(await text_events.__anext__(), TextDelta)  # the text request is decoding
        speech_job = scheduler.submit(
            _request([_text("Say hi")], max_new_tokens=4, mode=GenerationMode.AUDIO)
        )
        rest, (_, speech_events) = await asyncio.gather(_drain(text_events), _collect(speech_job))
    finally:
        scheduler.shutdown()
        hook.remove()
    assert rest[-1].output_tokens == 20
    assert speech_events[-1].audio_seconds > 0
    assert 2 in rows_per_step, f"the speech request never decoded beside the text one: {rows_per_step}"


async def _drain(events) -> list:
    return [event async for event in events]


# ---- control flow only ----------------------------------------------------------------------------


class FakeEmptyBatch:
    """A fake decode batch that never holds a row (the fake engines run every request alone)."""

    length = 0

    def __len__(self):
        return 0

    def fail_all(self, error):
        pass


class FakeBlockingEngine:
    """A fake engine whose preparation blocks until released: keeps requests waiting in the queue."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def prepare(self, request):
        self.release.wait(10)
        return Prepared(request, None, 1)

    def can_batch(self, prepared) -> bool:
        return False

    def open_batch(self):
        return FakeEmptyBatch()

    def run(self, prepared, emit, cancelled):
        emit(Summary("stop", 1, 0))

    def start_row(self, *args):
        raise AssertionError("not batched")


class FakeOutOfMemoryEngine(FakeBlockingEngine):
    """A fake engine whose run of a request saying "too big" hits an out-of-memory error (as torch reports
    it); other requests finish."""

    def prepare(self, request):
        return Prepared(request, None, 1)

    def run(self, prepared, emit, cancelled):
        if prepared.request.messages[0].content[0].text == "too big":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        emit(Summary("stop", 1, 0))


async def test_full_queue_is_refused_with_a_retry_delay():
    engine = FakeBlockingEngine()
    scheduler = _scheduler(engine, max_queue=2, queue_retry_after_s=0.5)
    try:
        jobs = [scheduler.submit(_request([_text("a")])) for _ in range(2)]
        with pytest.raises(LimitExceeded, match="queue is full") as err:
            scheduler.submit(_request([_text("b")]))
        assert err.value.retry_after_s == 0.5
        engine.release.set()
        for job in jobs:
            _, events = await _collect(job)
            assert isinstance(events[-1], Summary)
        scheduler.submit(_request([_text("c")]))  # room again
    finally:
        engine.release.set()
        scheduler.shutdown()


async def test_out_of_memory_fails_only_that_request():
    scheduler = _scheduler(FakeOutOfMemoryEngine())
    try:
        with pytest.raises(LimitExceeded, match="out of memory"):
            await _collect(scheduler.submit(_request([_text("too big")])))
        assert not scheduler.busy()
        # The worker still serves: the next request runs and finishes.
        _, events = await asyncio.wait_for(_collect(scheduler.submit(_request([_text("small")]))), 10)
        assert isinstance(events[-1], Summary) and events[-1].finish_reason == "stop"
    finally:
        scheduler.shutdown()


class FakeSlowMediaEngine(FakeBlockingEngine):
    """A fake engine whose preprocessing of requests with media blocks until released (a slow processor);
    text-only requests prepare at once."""

    def prepare(self, request):
        if any(p.type is not Modality.TEXT for m in request.messages for p in m.content):
            self.release.wait(10)
        return Prepared(request, None, 1)


async def test_text_requests_never_wait_behind_media_preprocessing():
    engine = FakeSlowMediaEngine()
    scheduler = _scheduler(engine, preprocess_threads=1)
    image = ContentPart(Modality.IMAGE, image=Image(np.zeros((8, 8, 3), np.uint8)))
    try:
        slow = [scheduler.submit(_request([image, _text("look")])) for _ in range(2)]
        _, events = await asyncio.wait_for(_collect(scheduler.submit(_request([_text("hi")]))), 5)
        assert isinstance(events[-1], Summary)
        assert not engine.release.is_set()  # the media requests are still being prepared
        engine.release.set()
        for job in slow:
            assert isinstance((await _collect(job))[1][-1], Summary)
    finally:
        engine.release.set()
        scheduler.shutdown()


class FakeSlowPrepareEngine(FakeBlockingEngine):
    """A fake engine whose preprocessing takes 0.3 s (a slow processor)."""

    def prepare(self, request):
        time.sleep(0.3)
        return Prepared(request, None, 1)


async def test_preprocessing_over_its_time_limit_is_refused():
    scheduler = _scheduler(FakeSlowPrepareEngine(), max_preprocess_s=0.1)
    try:
        with pytest.raises(
            LimitExceeded, match=r"preparing the request's inputs took 0\.\d s; the limit is 0\.1 s"
        ):
            await _collect(scheduler.submit(_request([_text("a")])))
        assert not scheduler.busy()
    finally:
        scheduler.shutdown()


class FakeRefusingModelEngine(FakeBlockingEngine):
    """A fake engine whose model raises what transformers' model code raises for inputs it cannot take."""

    def prepare(self, request):
        return Prepared(request, None, 1)

    def run(self, prepared, emit, cancelled):
        if prepared.request.messages[0].content[0].text == "bad":
            raise IndexError("index is out of bounds for dimension with size 0")
        emit(Summary("stop", 1, 0))


async def test_the_model_refusing_a_requests_content_fails_only_it_as_invalid():
    scheduler = _scheduler(FakeRefusingModelEngine())
    try:
        with pytest.raises(InvalidInput, match="cannot process this request's content"):
            await _collect(scheduler.submit(_request([_text("bad")])))
        assert isinstance((await _collect(scheduler.submit(_request([_text("good")]))))[1][-1], Summary)
    finally:
        scheduler.shutdown()


# ---- no autograd in serving ------------------------------------------------------------------------


def test_the_loaded_model_is_frozen(engine):
    assert not any(p.requires_grad for p in engine._model.parameters())


@pytest.mark.parametrize("runner", ["slots", "dynamic"])
def test_batched_decode_steps_record_no_autograd_history(runner, engine, dynamic_engine):
    """Each decode step runs under inference_mode, like the prefill: no cache, id or logits tensor can
    carry autograd history (with it on, a GPU worker kept one KV-cache copy alive per step), even where a
    parameter requires grad (a model loaded some other way)."""
    engine = engine if runner == "slots" else dynamic_engine
    assert engine.info.decode_runner.startswith(runner.replace("dynamic", "dynamic cache"))
    batch = engine.open_batch()
    done = []
    requests = [_request([_text("Tell me a story.")], 12), _request([_text("Hi")], 8)]
    layer = engine._gen_model.get_input_embeddings()
    layer.weight.requires_grad_(True)  # as an unfrozen model would have it
    try:
        for request in requests:
            engine.start_row(
                batch, engine.prepare(request), lambda e: None, done.append, threading.Event(), None
            )
        batch.step()
        batch.step()
        tensors = batch.state_tensors()
        assert tensors and all(t.grad_fn is None and not t.requires_grad for t in tensors)
    finally:
        layer.weight.requires_grad_(False)
        batch.fail_all(RuntimeError("test over"))
