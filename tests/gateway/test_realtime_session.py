"""The realtime session (``realtime/session.py``) and its server VAD (``realtime/vad.py``) on their own.

The VAD is the real Silero model on synthetic audio (``tests.support.speech_like``). The session runs on the
real gateway core (auth, media decoding, metrics) over a fake worker pool, named as one, whose calls play
scripted events or speak until they are cancelled (for barge-in and a client that goes away).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from omnigate.conversation import GenerationRequest, ModelInfo
from omnigate.worker.v1 import worker_pb2 as wk
from omnigate_gateway.core import Call, GatewayCore
from omnigate_gateway.realtime.events import (
    UNCHANGED,
    AppendAudio,
    AudioCleared,
    AudioContent,
    AudioDelta,
    CancelResponse,
    ClearAudio,
    CommitAudio,
    CreateItem,
    CreateResponse,
    Error,
    ItemCreated,
    OutputItemAdded,
    OutputItemDone,
    ResponseCreated,
    ResponseDone,
    ResponseOptions,
    SessionClosed,
    SessionCreated,
    SessionUpdated,
    SpeechStarted,
    TextContent,
    TextDelta,
    TurnDetection,
    UpdateSession,
)
from omnigate_gateway.realtime.session import RealtimeSession
from omnigate_gateway.realtime.vad import SpeechDetector, SpeechEnd, SpeechStart, load_silero
from omnigate_gateway.settings import GatewaySettings
from tests.support import speech_like
from tests.support.fake_workers import (
    SPEAKING_MODEL,
    FakeWorkerCall,
    FakeWorkerPool,
    core_over,
    rpc_error,
    summary,
    text,
)

RATE = speech_like.RATE


def spoken(seconds: float = 0.1) -> wk.GenerateResponse:
    """A worker's speech chunk: a 300 Hz tone at 24 kHz."""
    t = np.arange(int(seconds * RATE)) / RATE
    pcm = speech_like.pcm16(0.2 * np.sin(2 * np.pi * 300 * t))
    return wk.GenerateResponse(audio=wk.AudioChunk(pcm_s16le=pcm, sample_rate=RATE))


def turn(speech_s: float = 1.5, seed: int = 0) -> bytes:
    """The user says something, then pauses for a second."""
    samples = [speech_like.silence(0.5), speech_like.speech(speech_s, seed=seed), speech_like.silence(1.0)]
    return speech_like.pcm16(np.concatenate(samples))


@dataclass
class SpeakingCall(FakeWorkerCall):
    """A fake worker call that speaks until it is cancelled (and records when that was)."""

    cancelled_at: float | None = None

    async def __anext__(self) -> wk.GenerateResponse:
        await asyncio.sleep(0.01)
        return spoken(0.01)

    def cancel(self) -> None:
        if self.cancelled_at is None:
            self.cancelled_at = time.monotonic()
        self.cancelled = True


@dataclass
class SpeakingPool(FakeWorkerPool):
    """A fake pool serving SPEAKING_MODEL; ``endless`` calls speak until cancelled."""

    info: ModelInfo | None = field(default_factory=lambda: SPEAKING_MODEL)
    events: list = field(default_factory=lambda: [text("Hel"), spoken(), text("lo"), spoken(), summary(2)])
    endless: bool = False

    def generate(self, request: GenerationRequest, timeout_s: float | None, metadata=None) -> FakeWorkerCall:
        if not self.endless:
            return super().generate(request, timeout_s, metadata)
        self.calls.append((request, timeout_s, list(metadata or [])))
        call = SpeakingCall([])
        self.started.append(call)
        return call


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def pool() -> SpeakingPool:
    return SpeakingPool()


def _core(pool: SpeakingPool, registry: CollectorRegistry, **settings) -> GatewayCore:
    return core_over(pool, registry, GatewaySettings(**settings))


def _value(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


class Conversation:
    """A session with its outgoing events read into a list as they come."""

    def __init__(self, session: RealtimeSession) -> None:
        self.session = session
        self.seen: list = []
        self._read = 0
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for event in self.session.events():
            self.seen.append(event)
            self._arrived.set()

    async def until(self, kind: type, timeout_s: float = 20) -> list:
        """The events after the last ``until`` up to the first ``kind`` (included)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for index in range(self._read, len(self.seen)):
                if isinstance(self.seen[index], kind):
                    batch, self._read = self.seen[self._read : index + 1], index + 1
                    return batch
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {kind.__name__} in {timeout_s} s: {self.seen[self._read :]}"
            await asyncio.wait_for(self._arrived.wait(), remaining)

    async def close(self) -> None:
        await self.session.close()
        await self._task


async def _open(core: GatewayCore) -> Conversation:
    session = RealtimeSession(core, Call(rpc="Generate", protocol="http"), core.worker.require_info())
    await session.start()
    conversation = Conversation(session)
    await conversation.until(SessionCreated)
    return conversation


def _kinds(events: list) -> list[str]:
    return [type(e).__name__ for e in events]


# ---- server VAD: the real Silero model on synthetic audio ------------------------------------------------


def test_silero_hears_speech_like_audio_and_not_silence_tones_or_noise():
    model = load_silero()

    def probabilities(samples: np.ndarray) -> np.ndarray:
        import soxr

        audio = soxr.resample(samples, RATE, 16000).astype(np.float32)
        return np.array([model(np.array(audio[i : i + 512])) for i in range(0, audio.size - 511, 512)])

    speech = probabilities(speech_like.speech(2.0))
    t = np.arange(RATE) / RATE
    rng = np.random.default_rng(1)
    assert np.mean(speech > 0.5) > 0.7, speech.round(2)
    for other in (
        speech_like.silence(1.0),
        (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
        (0.01 * rng.standard_normal(RATE)).astype(np.float32),
    ):
        assert probabilities(other).max() < 0.2


def _detect(samples: np.ndarray, turns: TurnDetection) -> list:
    detector = SpeechDetector(turns, load_silero(), RATE)
    found = []
    for start in range(0, samples.size, RATE // 10):  # 100 ms chunks, as a microphone sends them
        found += detector.feed(samples[start : start + RATE // 10])
    return found


def test_speech_starts_at_the_voice_and_stops_after_the_silence_duration():
    samples = np.concatenate([speech_like.silence(0.5), speech_like.speech(1.5), speech_like.silence(1.0)])
    found = _detect(samples, TurnDetection())
    assert [type(f) for f in found] == [SpeechStart, SpeechEnd]
    assert 0.45 * RATE <= found[0].sample <= 0.65 * RATE
    assert 2.45 * RATE <= found[1].sample <= 2.8 * RATE  # 500 ms into the pause after 2.0 s
    assert _detect(speech_like.silence(2.0), TurnDetection()) == []


def test_a_pause_shorter_than_the_silence_duration_does_not_end_the_speech():
    pause = [speech_like.speech(1.0), speech_like.silence(0.4), speech_like.speech(1.0, seed=1)]
    samples = np.concatenate([*pause, speech_like.silence(1.0)])
    assert [type(f) for f in _detect(samples, TurnDetection(silence_duration_ms=500))] == [
        SpeechStart,
        SpeechEnd,
    ]
    short = _detect(samples, TurnDetection(silence_duration_ms=200))
    assert [type(f) for f in short] == [SpeechStart, SpeechEnd, SpeechStart, SpeechEnd]
    assert 1.0 * RATE <= short[2].sample <= 1.5 * RATE, "the second sentence starts after the pause"


# ---- the session ----------------------------------------------------------------------------------------


async def test_server_vad_commits_the_speech_and_answers_it(pool, registry):
    core = _core(pool, registry)
    conversation = await _open(core)
    session = conversation.session
    assert session.config.voice == "Chelsie" and session.config.output_modalities == ("audio",)
    await session.send(UpdateSession(instructions="Be brief."))
    await conversation.until(SessionUpdated)
    for chunk in speech_like.chunks(turn()):
        await session.send(AppendAudio(chunk))
    events = await conversation.until(ResponseDone)
    assert _kinds(events) == [
        "SpeechStarted",
        "SpeechStopped",
        "AudioCommitted",
        "ItemCreated",
        "ResponseCreated",
        "OutputItemAdded",
        "TextDelta",
        "AudioDelta",
        "TextDelta",
        "AudioDelta",
        "OutputItemDone",
        "ResponseDone",
    ]
    started, stopped, committed, created = events[:4]
    assert 100 <= started.audio_start_ms <= 400 and 2450 <= stopped.audio_end_ms <= 2800
    assert started.item_id == stopped.item_id == committed.item_id == created.item.id
    user = created.item.content[0]
    assert user.kind == "audio" and user.wav[:4] == b"RIFF"
    assert abs(user.duration_ms - (stopped.audio_end_ms - started.audio_start_ms)) <= 2
    # The request: the instructions, then the committed speech decoded at the model's 16 kHz; speech out.
    request = pool.calls[0][0]
    assert [m.role for m in request.messages] == ["system", "user"]
    heard = request.messages[1].content[0].audio
    assert heard.sample_rate == 16000 and abs(heard.samples.size / 16 - user.duration_ms) <= 2
    assert request.mode.value == "audio" and request.speaker == "Chelsie"
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert all(d.transcript for d in deltas) and "".join(d.text for d in deltas) == "Hello"
    assert sum(len(e.pcm) for e in events if isinstance(e, AudioDelta)) == 2 * 2 * 2400
    done = events[-1].response
    assert (
        done.status == "incomplete" and done.reason == "max_output_tokens" and done.usage.output_tokens == 2
    )
    assert done.output[0].content[0].text == "Hello" and done.output[0].status == "incomplete"
    assert [i.role for i in session.items] == ["user", "assistant"]
    assert _value(registry, "omnigate_gateway_realtime_responses_total", status="incomplete") == 1
    assert _value(registry, "omnigate_gateway_realtime_sessions") == 1
    await conversation.close()
    assert _value(registry, "omnigate_gateway_realtime_sessions") == 0


async def test_speech_while_an_answer_runs_cancels_it_in_the_worker(pool, registry, caplog):
    pool.endless = True
    core = _core(pool, registry)
    conversation = await _open(core)
    session = conversation.session
    await session.send(CreateItem("user", [TextContent("Tell me a long story.")]))
    await session.send(CreateResponse())
    await conversation.until(AudioDelta)
    caplog.set_level(logging.INFO, logger="omnigate_gateway.realtime.session")
    sent = time.monotonic()
    for chunk in speech_like.chunks(speech_like.pcm16(speech_like.speech(1.0))):
        await session.send(AppendAudio(chunk))
        if pool.started[0].cancelled:
            break
    events = await conversation.until(ResponseDone)
    started = next(e for e in events if isinstance(e, SpeechStarted))
    assert events.index(started) < len(events) - 1, "speech_started comes before the answer's response.done"
    done = events[-1].response
    assert done.status == "cancelled" and done.reason == "turn_detected"
    assert pool.started[0].cancelled, "the worker call was cancelled"
    logged = re.search(r"cancelled ([\d.]+) ms after speech was detected", caplog.text)
    assert logged, caplog.text
    print(
        f"\nbarge-in: first speech chunk sent -> worker call cancelled "
        f"{(pool.started[0].cancelled_at - sent) * 1000:.1f} ms; speech detected -> cancelled "
        f"{float(logged.group(1)):.1f} ms"
    )
    assert _value(registry, "omnigate_gateway_realtime_barge_ins_total") == 1
    assert _value(registry, "omnigate_gateway_realtime_barge_in_seconds_count") == 1
    assert _value(registry, "omnigate_gateway_realtime_responses_total", status="cancelled") == 1
    assert (
        _value(registry, "omnigate_gateway_requests_total", rpc="Generate", code="CANCELLED", mode="audio")
        == 1
    )
    await conversation.close()


async def test_one_answer_at_a_time_and_the_clients_cancel(pool, registry):
    pool.endless = True
    conversation = await _open(_core(pool, registry))
    session = conversation.session
    await session.send(CreateItem("user", [TextContent("Hi")]))
    await session.send(CreateResponse(ResponseOptions(voice="ethan", max_output_tokens=5)))
    response = (await conversation.until(ResponseCreated))[-1].response
    assert response.voice == "Ethan" and response.max_output_tokens == 5
    await session.send(CreateResponse(event_id="evt_2"))
    error = (await conversation.until(Error))[-1]
    assert error.code == "conversation_already_has_active_response" and error.event_id == "evt_2"
    await session.send(CancelResponse("resp_other"))
    assert (await conversation.until(Error))[-1].code == "response_cancel_not_active"
    await session.send(CancelResponse(response.id))
    done = (await conversation.until(ResponseDone))[-1].response
    assert done.id == response.id and done.status == "cancelled" and done.reason == "client_cancelled"
    assert pool.started[0].cancelled
    request = pool.calls[0][0]
    assert request.speaker == "Ethan" and request.params.max_new_tokens == 5
    await session.send(CancelResponse())
    assert (await conversation.until(Error))[-1].code == "response_cancel_not_active"
    await conversation.close()


async def test_a_client_that_leaves_frees_everything(pool, registry):
    pool.endless = True
    conversation = await _open(_core(pool, registry))
    await conversation.session.send(CreateItem("user", [TextContent("Tell me a long story.")]))
    await conversation.session.send(CreateResponse())
    await conversation.until(AudioDelta)
    await conversation.close()  # what the front door does when the connection drops
    assert pool.started[0].cancelled
    assert not [e for e in conversation.seen if isinstance(e, ResponseDone)], "nobody is told"
    assert _value(registry, "omnigate_gateway_realtime_sessions") == 0
    assert _value(registry, "omnigate_gateway_in_flight_requests") == 0
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith(("resp_", "realtime-idle"))]


async def test_manual_turns_and_the_buffer_limit(pool, registry):
    conversation = await _open(_core(pool, registry, realtime_max_buffer_s=1.0))
    session = conversation.session
    await session.send(UpdateSession(turn_detection=None))
    assert (await conversation.until(SessionUpdated))[-1].config.turn_detection is None
    await session.send(AppendAudio(b"\x00\x01\x02"))
    assert "even number of bytes" in (await conversation.until(Error))[-1].message
    await session.send(CommitAudio())
    assert (await conversation.until(Error))[-1].code == "input_audio_buffer_commit_empty"
    await session.send(AppendAudio(speech_like.pcm16(speech_like.speech(1.5))))
    error = (await conversation.until(Error))[-1]
    assert error.code == "input_audio_buffer_full" and "the limit is 1 s" in error.message
    await session.send(AppendAudio(speech_like.pcm16(speech_like.speech(0.8))))
    await session.send(ClearAudio())
    await conversation.until(AudioCleared)
    await session.send(AppendAudio(speech_like.pcm16(speech_like.speech(0.6))))
    await session.send(CommitAudio())
    events = await conversation.until(ItemCreated)
    assert _kinds(events) == ["AudioCommitted", "ItemCreated"], "no VAD events, no answer"
    assert events[-1].item.content[0].duration_ms == 600
    await asyncio.sleep(0.1)
    assert not pool.calls
    await conversation.close()


async def test_with_server_vad_a_long_utterance_is_committed_at_the_buffer_limit(pool, registry):
    conversation = await _open(_core(pool, registry, realtime_max_buffer_s=2.0))
    for chunk in speech_like.chunks(speech_like.pcm16(speech_like.speech(3.0))):
        await conversation.session.send(AppendAudio(chunk))
    events = await conversation.until(ItemCreated)
    assert _kinds(events) == ["SpeechStarted", "SpeechStopped", "AudioCommitted", "ItemCreated"]
    assert events[-1].item.content[0].duration_ms == 2000
    await conversation.until(ResponseDone)
    await conversation.close()


async def test_history_and_request_bounds(pool, registry):
    conversation = await _open(_core(pool, registry, realtime_max_items=4, max_media_items=1))
    session = conversation.session
    await session.send(UpdateSession(turn_detection=None))
    for index in range(3):
        audio = AudioContent(speech_like.pcm16(speech_like.speech(0.3, seed=index)))
        await session.send(CreateItem("user", [TextContent(f"clip {index}"), audio]))
    await session.send(CreateItem("assistant", [TextContent("ok")], item_id="item_mine"))
    created = [(await conversation.until(ItemCreated))[-1] for _ in range(4)]
    assert created[-1].item.id == "item_mine" and created[-1].previous_item_id == created[-2].item.id
    assert [i.content[0].text for i in session.items] == ["clip 0", "clip 1", "clip 2", "ok"]
    kept = [bool(i.content[1].wav) for i in session.items if i.role == "user"]
    assert kept == [False, False, True], "audio no request can carry any more (max_media_items) is freed"
    await session.send(CreateItem("user", [TextContent("again")], item_id="item_mine"))
    assert "already exists" in (await conversation.until(Error))[-1].message
    await session.send(CreateItem("user", [TextContent("x")], previous_item_id="item_elsewhere"))
    assert (await conversation.until(Error))[-1].param == "previous_item_id"
    await session.send(CreateItem("system", [AudioContent(b"\x00\x00" * 4800)]))
    assert "takes text only" in (await conversation.until(Error))[-1].message
    await session.send(CreateItem("user", [TextContent("and now?")]))
    await conversation.until(ItemCreated)
    assert [i.content[0].text for i in session.items][0] == "clip 1", "the oldest item was dropped"
    await session.send(CreateResponse(ResponseOptions(output_modalities=("text",))))
    await conversation.until(ResponseDone)
    request = pool.calls[0][0]
    assert request.mode.value == "text" and not request.speaker
    # One audio item fits max_media_items: the request starts at the newest one.
    texts = [p.text for m in request.messages for p in m.content if p.text]
    assert texts == ["clip 2", "ok", "and now?"]
    assert sum(1 for m in request.messages for p in m.content if p.audio is not None) == 1
    await conversation.close()


async def test_session_update_checks_against_the_model(pool, registry):
    conversation = await _open(_core(pool, registry))
    session = conversation.session
    refusals = [
        (UpdateSession(voice="alloy"), "voice", "Chelsie, Ethan"),
        (UpdateSession(output_modalities=("text", "audio")), "output_modalities", "['audio']"),
        (UpdateSession(max_output_tokens=0), "max_output_tokens", "between 1 and 512"),
        (
            UpdateSession(turn_detection=TurnDetection(threshold=2)),
            "turn_detection.threshold",
            "between 0 and 1",
        ),
    ]
    for update, param, says in refusals:
        await session.send(update)
        error = (await conversation.until(Error))[-1]
        assert error.param == param and says in error.message, error
    assert session.config.voice == "Chelsie", "a refused update changes nothing"
    await session.send(UpdateSession(voice="ETHAN", max_output_tokens=None, turn_detection=UNCHANGED))
    config = (await conversation.until(SessionUpdated))[-1].config
    assert config.voice == "Ethan" and config.turn_detection == TurnDetection()
    await conversation.close()


async def test_a_failed_answer_is_reported_and_the_session_goes_on(pool, registry):
    import grpc

    pool.events = [text("Hel"), rpc_error(grpc.StatusCode.INTERNAL, "the talker broke")]
    conversation = await _open(_core(pool, registry))
    await conversation.session.send(CreateItem("user", [TextContent("Hi")]))
    await conversation.session.send(CreateResponse())
    events = await conversation.until(ResponseDone)
    assert isinstance(events[-2], OutputItemDone) and events[-2].item.content[0].text == "Hel"
    done = events[-1].response
    assert done.status == "failed" and done.error is not None and done.error.kind.value == "internal"
    pool.events = [text("ok"), summary(1)]
    await conversation.session.send(CreateResponse())
    assert (await conversation.until(ResponseDone))[-1].response.status == "incomplete"
    await conversation.close()


async def test_an_idle_session_is_closed(pool, registry):
    started = time.monotonic()  # before the session opens: its idle clock starts there
    conversation = await _open(_core(pool, registry, realtime_idle_timeout_s=0.3))
    events = await conversation.until(SessionClosed, timeout_s=5)
    assert 0.25 <= time.monotonic() - started <= 2
    assert isinstance(events[-2], Error) and events[-2].code == "session_expired"
    await conversation.close()


async def test_events_are_what_a_front_door_needs(pool, registry):
    """The first answer's output item is announced with the previous item's id, for ordering."""
    conversation = await _open(_core(pool, registry))
    await conversation.session.send(CreateItem("user", [TextContent("Hi")], item_id="item_hi"))
    await conversation.session.send(CreateResponse())
    added = next(e for e in await conversation.until(ResponseDone) if isinstance(e, OutputItemAdded))
    assert added.previous_item_id == "item_hi" and added.item.status == "in_progress"
    assert not added.item.content[0].text, "announced before any text (a snapshot, not the live item)"
    await conversation.close()
