"""``GatewayService.Converse`` (``grpc_api/converse.py``) on its own: the conversions between the proto
messages and the realtime session's events (every oneof case both ways, and the refusals), then the handler
on a real gRPC server and core over a fake worker pool, named as one: how the stream starts (auth, no
worker), goes on past a refused message, ends (half-close after the last answer, idle close) and frees the
worker call when the client cancels.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry

from omnigate.errors import ErrorCode
from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate.gateway.v1 import gateway_pb2_grpc
from omnigate.grpc_server import Undecodable, add_service
from omnigate.worker.v1 import worker_pb2 as wk
from omnigate_gateway.grpc_api.converse import Refusal, client_event, server_message
from omnigate_gateway.grpc_api.server import GatewayServicer
from omnigate_gateway.realtime.events import (
    UNCHANGED,
    AppendAudio,
    AudioCleared,
    AudioCommitted,
    AudioContent,
    AudioDelta,
    CancelResponse,
    ClearAudio,
    CommitAudio,
    ContentPart,
    CreateItem,
    CreateResponse,
    Error,
    Item,
    ItemCreated,
    OutputItemAdded,
    OutputItemDone,
    Response,
    ResponseCreated,
    ResponseDone,
    ResponseOptions,
    SessionClosed,
    SessionConfig,
    SessionCreated,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TextContent,
    TextDelta,
    TurnDetection,
    UpdateSession,
    Usage,
)
from omnigate_gateway.settings import GatewaySettings
from tests.support.fake_workers import (
    SPEAKING_MODEL,
    FakeWorkerCall,
    FakeWorkerPool,
    core_over,
    summary,
    text,
)
from tests.support.waiting import async_wait_until


def test_every_client_message_becomes_its_session_event():
    cases = [
        (
            gw.ConverseRequest(
                event_id="e1",
                session_update=gw.SessionUpdate(
                    instructions="Be brief.",
                    voice="ethan",
                    generation_mode=gw.GENERATION_MODE_TEXT,
                    turn_detection=gw.TurnDetection(
                        type=gw.TURN_DETECTION_TYPE_SERVER_VAD, threshold=0.3, silence_duration_ms=200
                    ),
                    max_output_tokens=0,
                ),
            ),
            UpdateSession(
                instructions="Be brief.",
                voice="ethan",
                output_modalities=("text",),
                turn_detection=TurnDetection(threshold=0.3, silence_duration_ms=200),
                max_output_tokens=None,
                event_id="e1",
            ),
        ),
        (
            gw.ConverseRequest(session_update=gw.SessionUpdate(max_output_tokens=8)),
            UpdateSession(max_output_tokens=8),
        ),
        (
            gw.ConverseRequest(
                session_update=gw.SessionUpdate(
                    turn_detection=gw.TurnDetection(type=gw.TURN_DETECTION_TYPE_NONE)
                )
            ),
            UpdateSession(turn_detection=None),
        ),
        (
            gw.ConverseRequest(input_audio_append=gw.InputAudioAppend(pcm=b"\x01\x00")),
            AppendAudio(b"\x01\x00"),
        ),
        (gw.ConverseRequest(event_id="c", input_audio_commit=gw.InputAudioCommit()), CommitAudio("c")),
        (gw.ConverseRequest(input_audio_clear=gw.InputAudioClear()), ClearAudio()),
        (
            gw.ConverseRequest(
                item_create=gw.ItemCreate(
                    role="user",
                    content=[gw.InputContent(audio_pcm=b"\x00\x00"), gw.InputContent(text="What is this?")],
                    item_id="mine",
                )
            ),
            CreateItem("user", [AudioContent(b"\x00\x00"), TextContent("What is this?")], item_id="mine"),
        ),
        (
            gw.ConverseRequest(
                item_create=gw.ItemCreate(
                    role="system", content=[gw.InputContent(text="x")], previous_item_id="p"
                )
            ),
            CreateItem("system", [TextContent("x")], previous_item_id="p"),
        ),
        (gw.ConverseRequest(response_create=gw.ResponseCreate()), CreateResponse(ResponseOptions())),
        (
            gw.ConverseRequest(
                event_id="r",
                response_create=gw.ResponseCreate(
                    instructions="",
                    voice="Chelsie",
                    generation_mode=gw.GENERATION_MODE_AUDIO,
                    max_output_tokens=16,
                    metadata={"turn": "3"},
                ),
            ),
            CreateResponse(
                ResponseOptions(
                    instructions="",
                    voice="Chelsie",
                    output_modalities=("audio",),
                    max_output_tokens=16,
                    metadata={"turn": "3"},
                ),
                "r",
            ),
        ),
        (
            gw.ConverseRequest(response_create=gw.ResponseCreate(max_output_tokens=0)),
            CreateResponse(ResponseOptions(max_output_tokens=None)),
        ),
        (gw.ConverseRequest(response_cancel=gw.ResponseCancel()), CancelResponse()),
        (
            gw.ConverseRequest(response_cancel=gw.ResponseCancel(response_id="resp_1")),
            CancelResponse("resp_1"),
        ),
    ]
    kinds = {message.WhichOneof("event") for message, _ in cases}
    assert kinds == {f.name for f in gw.ConverseRequest.DESCRIPTOR.oneofs_by_name["event"].fields}
    for message, expected in cases:
        assert client_event(message) == expected, message
    assert client_event(gw.ConverseRequest(session_update=gw.SessionUpdate())) == UpdateSession()
    assert UpdateSession().max_output_tokens is UNCHANGED


def _refused(message: gw.ConverseRequest | Undecodable) -> Refusal:
    with pytest.raises(Refusal) as refused:
        client_event(message)
    return refused.value


@pytest.mark.parametrize(
    ("message", "code", "field", "words"),
    [
        (gw.ConverseRequest(event_id="e9"), "unknown_event", "event", "input_audio_append"),
        (
            gw.ConverseRequest(session_update=gw.SessionUpdate(generation_mode=gw.GENERATION_MODE_IMAGE)),
            "invalid_value",
            "session_update.generation_mode",
            "GENERATION_MODE_IMAGE",
        ),
        (
            gw.ConverseRequest(
                response_create=gw.ResponseCreate(generation_mode=gw.GENERATION_MODE_UNSPECIFIED)
            ),
            "invalid_value",
            "response_create.generation_mode",
            "GENERATION_MODE_UNSPECIFIED",
        ),
        (
            gw.ConverseRequest(session_update=gw.SessionUpdate(turn_detection=gw.TurnDetection())),
            "invalid_value",
            "session_update.turn_detection.type",
            "TURN_DETECTION_TYPE_SERVER_VAD",
        ),
        (
            gw.ConverseRequest(item_create=gw.ItemCreate(role="tool", content=[gw.InputContent(text="x")])),
            "invalid_value",
            "item_create.role",
            '"user", "assistant" or "system"',
        ),
        (
            gw.ConverseRequest(item_create=gw.ItemCreate(role="user", content=[gw.InputContent()])),
            "invalid_value",
            "item_create.content[0]",
            "text or audio_pcm",
        ),
        (
            gw.ConverseRequest(response_create=gw.ResponseCreate(metadata={f"k{i}": "v" for i in range(17)})),
            "invalid_value",
            "response_create.metadata",
            "at most 16",
        ),
    ],
)
def test_a_message_the_session_cannot_take_is_refused_naming_what_is_wrong(message, code, field, words):
    refusal = _refused(message)
    assert (refusal.code, refusal.field) == (code, field)
    assert words in refusal.message
    assert refusal.event_id == (message.event_id or None)


def test_an_unreadable_message_is_refused():
    undecodable = Undecodable("omnigate.gateway.v1.ConverseRequest", DecodeError("truncated"))
    refusal = _refused(undecodable)
    assert refusal.code == "invalid_message" and "ConverseRequest" in refusal.message


CONFIG = SessionConfig(model="fake/omni", voice="Chelsie", output_modalities=("audio",), instructions="Hi")


def _item(status: str = "completed") -> Item:
    return Item("item_2", "assistant", [ContentPart("audio", text="Hello")], status)  # type: ignore[arg-type]


def _response(status: str) -> Response:
    response = Response("resp_1", ("audio",), "Chelsie", None, metadata={"turn": "1"})
    response.status = status  # type: ignore[assignment]
    return response


def test_every_session_event_becomes_its_message():
    user = Item(
        "item_1", "user", [ContentPart("audio", wav=b"RIFF", duration_ms=1500), ContentPart("text", "hi")]
    )
    done = _response("cancelled")
    done.reason, done.output, done.usage = "turn_detected", [_item("incomplete")], Usage(30, 4)
    failed = _response("failed")
    failed.error = Error("the worker failed", "unavailable", ErrorCode.UNAVAILABLE)
    manual = SessionConfig("fake/omni", "", ("text",), turn_detection=None, max_output_tokens=8)
    expected = {
        "session_created": (SessionCreated("sess_1", CONFIG), None),
        "session_updated": (SessionUpdated("sess_1", manual), None),
        "speech_started": (SpeechStarted(200, "item_1"), None),
        "speech_stopped": (SpeechStopped(2600, "item_1"), None),
        "input_audio_committed": (AudioCommitted("item_1", None), None),
        "input_audio_cleared": (AudioCleared(), None),
        "item_created": (ItemCreated(user, None), None),
        "response_created": (ResponseCreated(_response("in_progress")), None),
        "output_item_added": (OutputItemAdded("resp_1", _item("in_progress"), "item_1"), None),
        "output_text_delta": (TextDelta("resp_1", "item_2", "Hel", transcript=True), None),
        "output_audio_delta": (AudioDelta("resp_1", "item_2", b"\x01\x00\x02\x00"), None),
        "output_item_done": (OutputItemDone("resp_1", _item()), None),
        "response_done": (ResponseDone(done), None),
        "event_refused": (Error("no", "invalid_value", param="output_modalities", event_id="e1"), None),
    }
    assert set(expected) == {f.name for f in gw.ConverseResponse.DESCRIPTOR.oneofs_by_name["event"].fields}
    messages = {kind: server_message(event, audio_sequence=3) for kind, (event, _) in expected.items()}
    for kind, message in messages.items():
        assert message is not None and message.WhichOneof("event") == kind

    created = messages["session_created"].session_created
    assert (created.id, created.model, created.voice, created.instructions) == (
        "sess_1",
        "fake/omni",
        "Chelsie",
        "Hi",
    )
    assert created.generation_mode == gw.GENERATION_MODE_AUDIO and created.audio_sample_rate == 24000
    assert created.max_output_tokens == 0
    turns = created.turn_detection
    assert turns.type == gw.TURN_DETECTION_TYPE_SERVER_VAD
    assert (turns.threshold, turns.prefix_padding_ms, turns.silence_duration_ms) == (0.5, 300, 500)
    assert turns.create_response and turns.interrupt_response
    updated = messages["session_updated"].session_updated
    assert updated.turn_detection.type == gw.TURN_DETECTION_TYPE_NONE
    assert updated.generation_mode == gw.GENERATION_MODE_TEXT and updated.max_output_tokens == 8

    assert messages["speech_started"].speech_started == gw.SpeechStarted(audio_start_ms=200, item_id="item_1")
    assert messages["speech_stopped"].speech_stopped == gw.SpeechStopped(audio_end_ms=2600, item_id="item_1")
    assert messages["input_audio_committed"].input_audio_committed == gw.InputAudioCommitted(item_id="item_1")
    item = messages["item_created"].item_created.item
    assert (item.id, item.role, item.status) == ("item_1", "user", gw.ITEM_STATUS_COMPLETED)
    assert item.content[0].audio.duration_ms == 1500 and item.content[1].text == "hi"
    assert messages["item_created"].item_created.previous_item_id == ""

    response = messages["response_created"].response_created
    assert (response.id, response.status, response.voice) == (
        "resp_1",
        gw.RESPONSE_STATUS_IN_PROGRESS,
        "Chelsie",
    )
    assert response.metadata == {"turn": "1"} and not response.HasField("usage") and not response.output
    added = messages["output_item_added"].output_item_added
    assert added.item.status == gw.ITEM_STATUS_IN_PROGRESS and added.previous_item_id == "item_1"
    assert messages["output_text_delta"].output_text_delta == gw.OutputTextDelta(
        response_id="resp_1", item_id="item_2", text="Hel", transcript=True
    )
    audio = messages["output_audio_delta"].output_audio_delta.audio
    assert (audio.pcm, audio.sample_rate, audio.channels, audio.sequence) == (
        b"\x01\x00\x02\x00",
        24000,
        1,
        3,
    )
    assert audio.encoding == gw.AUDIO_ENCODING_PCM_S16LE
    assert messages["output_item_done"].output_item_done.item.content[0].audio.transcript == "Hello"

    finished = messages["response_done"].response_done
    assert (finished.status, finished.reason) == (gw.RESPONSE_STATUS_CANCELLED, "turn_detected")
    assert finished.output[0].status == gw.ITEM_STATUS_INCOMPLETE
    assert (finished.usage.input_tokens, finished.usage.output_tokens) == (30, 4)
    failure = server_message(ResponseDone(failed))
    assert failure is not None
    assert failure.response_done.status == gw.RESPONSE_STATUS_FAILED
    assert (failure.response_done.reason, failure.response_done.message) == (
        "unavailable",
        "the worker failed",
    )

    refused = messages["event_refused"].event_refused
    assert refused == gw.EventRefused(
        event_id="e1", message="no", reason="invalid_value", field="generation_mode"
    ), "the session's output_modalities is the proto's generation_mode"
    assert server_message(SessionClosed("idle")) is None


def _worker_audio(samples: int = 2400) -> wk.GenerateResponse:
    """A worker's speech chunk: a tone, 16-bit PCM at 24 kHz."""
    pcm = (0.2 * np.sin(np.arange(samples) / 3) * 32767).astype("<i2").tobytes()
    return wk.GenerateResponse(audio=wk.AudioChunk(pcm_s16le=pcm, sample_rate=24000))


@dataclass
class EndlessCall(FakeWorkerCall):
    """A fake worker call that speaks until it is cancelled."""

    async def __anext__(self) -> wk.GenerateResponse:
        await asyncio.sleep(0.01)
        self.read += 1
        return text("a") if self.read % 2 else _worker_audio(240)


@dataclass
class SpeakingPool(FakeWorkerPool):
    """A fake pool serving a model that hears and speaks; ``endless`` calls speak until cancelled."""

    endless: bool = False

    def generate(self, request, timeout_s, metadata=None):  # type: ignore[no-untyped-def]
        if not self.endless:
            return super().generate(request, timeout_s, metadata)
        call = EndlessCall([])
        self.started.append(call)
        return call


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


async def _serve(
    pool: FakeWorkerPool, registry: CollectorRegistry, **settings
) -> AsyncIterator[grpc.aio.Channel]:
    core = core_over(pool, registry, GatewaySettings(**settings))
    server = grpc.aio.server()
    add_service(server, GatewayServicer(core), gw.DESCRIPTOR.services_by_name["GatewayService"])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(None)


@pytest.fixture
async def pool_and_channel(registry):
    pool = SpeakingPool(
        info=SPEAKING_MODEL, events=[text("Hel"), _worker_audio(), text("lo"), _worker_audio(), summary(2)]
    )
    async for channel in _serve(pool, registry, realtime_idle_timeout_s=30):
        yield pool, channel


def _user_text(words: str) -> gw.ConverseRequest:
    return gw.ConverseRequest(item_create=gw.ItemCreate(role="user", content=[gw.InputContent(text=words)]))


def _kinds(messages: list[gw.ConverseResponse]) -> list[str]:
    return [m.WhichOneof("event") or "" for m in messages]


async def test_a_half_closed_conversation_ends_after_its_last_answer(pool_and_channel, registry):
    _, channel = pool_and_channel
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    call = stub.Converse(metadata=(("x-request-id", "conv-1"),))
    await call.write(_user_text("Hi"))
    await call.write(gw.ConverseRequest(response_create=gw.ResponseCreate(max_output_tokens=2)))
    await call.done_writing()  # at once: the answer still runs to its end
    messages = [message async for message in call]
    assert await call.code() == grpc.StatusCode.OK
    assert dict(await call.initial_metadata())["x-request-id"] == "conv-1"
    assert _kinds(messages) == [
        "session_created",
        "item_created",
        "response_created",
        "output_item_added",
        "output_text_delta",
        "output_audio_delta",
        "output_text_delta",
        "output_audio_delta",
        "output_item_done",
        "response_done",
    ]
    assert [m.output_audio_delta.audio.sequence for m in messages if m.HasField("output_audio_delta")] == [
        0,
        1,
    ]
    done = messages[-1].response_done
    assert done.status == gw.RESPONSE_STATUS_INCOMPLETE and done.reason == "max_output_tokens"
    assert done.output[0].content[0].audio.transcript == "Hello" and done.max_output_tokens == 2
    assert registry.get_sample_value("omnigate_gateway_realtime_sessions") == 0


async def test_a_refused_message_leaves_the_conversation_open(pool_and_channel):
    _, channel = pool_and_channel
    raw = channel.stream_stream(
        "/omnigate.gateway.v1.GatewayService/Converse",
        request_serializer=lambda data: data,
        response_deserializer=gw.ConverseResponse.FromString,
    )
    call = raw()
    assert (await call.read()).HasField("session_created")
    await call.write(gw.ConverseRequest(event_id="e1").SerializeToString())  # no event
    await call.write(b"\x0a\xff")  # not a ConverseRequest
    update = gw.ConverseRequest(event_id="e3", session_update=gw.SessionUpdate(voice="nobody"))
    await call.write(update.SerializeToString())
    await call.write(gw.ConverseRequest(input_audio_commit=gw.InputAudioCommit()).SerializeToString())
    await call.write(gw.ConverseRequest(session_update=gw.SessionUpdate(voice="ethan")).SerializeToString())
    refusals = [(await call.read()).event_refused for _ in range(4)]
    assert [(r.event_id, r.reason, r.field) for r in refusals] == [
        ("e1", "unknown_event", "event"),
        ("", "invalid_message", ""),
        ("e3", "invalid_value", "voice"),
        ("", "input_audio_buffer_commit_empty", ""),
    ]
    assert "Chelsie, Ethan" in refusals[2].message
    assert (await call.read()).session_updated.voice == "Ethan"
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_a_client_that_cancels_mid_answer_stops_the_worker_call(registry):
    pool = SpeakingPool(info=SPEAKING_MODEL, endless=True)
    async for channel in _serve(pool, registry):
        call = gateway_pb2_grpc.GatewayServiceStub(channel).Converse()
        await call.write(_user_text("Talk to me."))
        await call.write(gw.ConverseRequest(response_create=gw.ResponseCreate()))
        while not (await asyncio.wait_for(call.read(), 10)).HasField("output_audio_delta"):
            pass
        assert pool.started and not pool.started[0].cancelled
        call.cancel()
        await async_wait_until(lambda: pool.started[0].cancelled, timeout_s=5)
        await async_wait_until(
            lambda: registry.get_sample_value("omnigate_gateway_realtime_sessions") == 0, timeout_s=5
        )


async def test_an_idle_conversation_ends_with_deadline_exceeded(registry):
    async for channel in _serve(SpeakingPool(info=SPEAKING_MODEL), registry, realtime_idle_timeout_s=0.3):
        call = gateway_pb2_grpc.GatewayServiceStub(channel).Converse()
        assert (await call.read()).HasField("session_created")
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "idle for 0.3 s" in (ended.value.details() or "")


async def test_the_call_is_refused_without_a_key_or_a_ready_worker(registry, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("alice:secret-0123456789\n")
    async for channel in _serve(SpeakingPool(info=SPEAKING_MODEL), registry, api_keys_file=str(keys)):
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            call = stub.Converse(metadata=metadata)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.read()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        call = stub.Converse(metadata=(("authorization", "Bearer secret-0123456789"),))
        assert (await call.read()).HasField("session_created")
        call.cancel()
    async for channel in _serve(SpeakingPool(info=None), CollectorRegistry()):
        call = gateway_pb2_grpc.GatewayServiceStub(channel).Converse()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
