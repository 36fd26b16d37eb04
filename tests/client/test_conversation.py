"""Unit tests of the SDK's Converse messages and events (``omnigate_client.protocol``; no server): each send
method's message as the gateway reads it (``grpc_api.converse.client_event``), each of the gateway's events
as the SDK's type (``converse_event_from_proto`` over ``grpc_api.converse.server_message``), and the audio
the SDK takes."""

from __future__ import annotations

import numpy as np
import pytest

from omnigate.errors import ErrorCode
from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate_client import (
    AudioCleared,
    AudioCommitted,
    ConversationItem,
    EventRefused,
    ItemContent,
    ItemCreated,
    OutputAudioDelta,
    OutputItemAdded,
    OutputItemDone,
    OutputTextDelta,
    ResponseCreated,
    ResponseDone,
    SessionCreated,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TurnDetection,
    Usage,
)
from omnigate_client.protocol import (
    audio_append_request,
    audio_clear_request,
    audio_commit_request,
    converse_event_from_proto,
    item_create_request,
    opening_request,
    pcm16,
    response_cancel_request,
    response_create_request,
    session_update_request,
)
from omnigate_gateway.grpc_api import converse as gateway
from omnigate_gateway.realtime import events as session


def test_audio_is_sent_as_16_bit_pcm():
    floats = np.array([0.0, 0.5, -1.0, 2.0], dtype=np.float32)
    assert np.frombuffer(pcm16(floats), "<i2").tolist() == [0, 16383, -32767, 32767]
    ints = np.array([1, -2, 300], dtype=np.int16)
    assert pcm16(ints) == ints.astype("<i2").tobytes() == pcm16(ints.astype("<i2").tobytes())
    assert pcm16(bytearray(b"\x01\x00")) == b"\x01\x00"
    for bad, words in (
        (np.zeros((2, 2), dtype=np.float32), "mono"),
        (np.zeros(3, dtype=np.int32), "int16 or float"),
        (b"\x01", "even number"),
        ([0.1, 0.2], "numpy array"),
    ):
        with pytest.raises(ValueError, match=words):
            pcm16(bad)  # type: ignore[arg-type]


def test_every_send_method_is_read_by_the_gateway_as_meant():
    audio = np.zeros(2400, dtype=np.float32)
    cases = [
        (
            session_update_request(
                instructions="Be brief.",
                voice="ethan",
                output_mode="text",
                turn_detection=TurnDetection(silence_duration_ms=200),
                max_output_tokens=0,
                event_id="e1",
            ),
            session.UpdateSession(
                instructions="Be brief.",
                voice="ethan",
                output_modalities=("text",),
                turn_detection=session.TurnDetection(silence_duration_ms=200),
                max_output_tokens=None,
                event_id="e1",
            ),
        ),
        (session_update_request(turn_detection=False), session.UpdateSession(turn_detection=None)),
        (
            session_update_request(turn_detection=True, max_output_tokens=8),
            session.UpdateSession(turn_detection=session.TurnDetection(), max_output_tokens=8),
        ),
        (session_update_request(), session.UpdateSession()),
        (audio_append_request(audio), session.AppendAudio(bytes(4800))),
        (audio_commit_request("c"), session.CommitAudio("c")),
        (audio_clear_request(), session.ClearAudio()),
        (
            item_create_request("What is this?", audio, item_id="mine"),
            session.CreateItem(
                "user",
                [session.AudioContent(bytes(4800)), session.TextContent("What is this?")],
                item_id="mine",
            ),
        ),
        (
            item_create_request("Earlier answer.", role="assistant", previous_item_id="p"),
            session.CreateItem("assistant", [session.TextContent("Earlier answer.")], previous_item_id="p"),
        ),
        (response_create_request(), session.CreateResponse()),
        (
            response_create_request(
                instructions="",
                voice="Chelsie",
                output_mode="audio",
                max_output_tokens=4,
                metadata={"a": "b"},
            ),
            session.CreateResponse(
                session.ResponseOptions(
                    instructions="",
                    voice="Chelsie",
                    output_modalities=("audio",),
                    max_output_tokens=4,
                    metadata={"a": "b"},
                )
            ),
        ),
        (response_cancel_request(), session.CancelResponse()),
        (response_cancel_request("resp_1", "x"), session.CancelResponse("resp_1", "x")),
    ]
    for request, expected in cases:
        assert gateway.client_event(request) == expected, request
    assert opening_request(None, None, None, None, None) is None
    opening = opening_request(None, None, None, False, None)
    assert opening is not None and gateway.client_event(opening) == session.UpdateSession(turn_detection=None)
    with pytest.raises(ValueError, match="output_mode"):
        session_update_request(output_mode="image")
    with pytest.raises(ValueError, match="text, audio or both"):
        item_create_request()


def test_every_gateway_event_becomes_its_sdk_type():
    config = session.SessionConfig("fake/omni", "Chelsie", ("audio",), "Hi", max_output_tokens=8)
    user = session.Item("item_1", "user", [session.ContentPart("audio", duration_ms=1500)])
    answer = session.Item("item_2", "assistant", [session.ContentPart("audio", text="Hello")], "incomplete")
    done = session.Response("resp_1", ("audio",), "Chelsie", 8, {"k": "v"}, "cancelled", "turn_detected")
    done.output, done.usage = [answer], session.Usage(30, 4)
    failed = session.Response("resp_2", ("text",), "Chelsie", None, status="failed")
    failed.error = session.Error("the worker failed", "unavailable", ErrorCode.UNAVAILABLE)
    sdk_answer = ConversationItem("item_2", "assistant", [ItemContent("audio", "Hello")], "incomplete")
    manual = session.SessionConfig("fake/omni", "", ("text",), turn_detection=None)
    cases = [
        (session.SessionCreated("sess_1", config), SessionCreated),
        (session.SessionUpdated("sess_1", manual), SessionUpdated),
        (session.SpeechStarted(200, "item_1"), SpeechStarted(200, "item_1")),
        (session.SpeechStopped(2600, "item_1"), SpeechStopped(2600, "item_1")),
        (session.AudioCommitted("item_1", None), AudioCommitted("item_1", None)),
        (session.AudioCleared(), AudioCleared()),
        (
            session.ItemCreated(user, "item_0"),
            ItemCreated(
                ConversationItem("item_1", "user", [ItemContent("audio", "", 1500)], "completed"), "item_0"
            ),
        ),
        (session.ResponseCreated(done), ResponseCreated),
        (
            session.OutputItemAdded("resp_1", answer, "item_1"),
            OutputItemAdded("resp_1", sdk_answer, "item_1"),
        ),
        (
            session.TextDelta("resp_1", "item_2", "Hel", True),
            OutputTextDelta("resp_1", "item_2", "Hel", True),
        ),
        (session.AudioDelta("resp_1", "item_2", b"\x01\x00"), OutputAudioDelta),
        (session.OutputItemDone("resp_1", answer), OutputItemDone("resp_1", sdk_answer)),
        (session.ResponseDone(done), ResponseDone),
        (
            session.Error("no", "invalid_value", param="voice", event_id="e1"),
            EventRefused("no", "invalid_value", "voice", "e1"),
        ),
    ]
    seen = {}
    for event, expected in cases:
        message = gateway.server_message(event, audio_sequence=2)
        assert message is not None
        got = converse_event_from_proto(message)
        seen[message.WhichOneof("event")] = got
        if isinstance(expected, type):
            assert isinstance(got, expected), (event, got)
        else:
            assert got == expected, event
    assert set(seen) == {f.name for f in pb.ConverseResponse.DESCRIPTOR.oneofs_by_name["event"].fields}

    created = seen["session_created"].session
    assert (created.id, created.model, created.voice, created.output_mode) == (
        "sess_1",
        "fake/omni",
        "Chelsie",
        "audio",
    )
    assert created.turn_detection == TurnDetection() and created.max_output_tokens == 8
    assert (created.instructions, created.sample_rate) == ("Hi", 24000)
    updated = seen["session_updated"].session
    assert (
        updated.turn_detection is None and updated.output_mode == "text" and updated.max_output_tokens is None
    )
    audio = seen["output_audio_delta"].audio
    assert (audio.pcm_s16le, audio.sample_rate, audio.channels, audio.sequence) == (b"\x01\x00", 24000, 1, 2)
    response = seen["response_done"].response
    assert (response.id, response.status, response.reason, response.message) == (
        "resp_1",
        "cancelled",
        "turn_detected",
        None,
    )
    assert response.output == [sdk_answer] and response.text == "Hello" and response.usage == Usage(30, 4)
    assert (response.output_mode, response.voice, response.max_output_tokens, response.metadata) == (
        "audio",
        "Chelsie",
        8,
        {"k": "v"},
    )
    failure = converse_event_from_proto(gateway.server_message(session.ResponseDone(failed)))  # type: ignore[arg-type]
    assert isinstance(failure, ResponseDone)
    assert (failure.response.status, failure.response.reason) == ("failed", "unavailable")
    assert failure.response.message == "the worker failed" and failure.response.usage is None
    assert converse_event_from_proto(pb.ConverseResponse()) is None, (
        "an event a newer gateway sends is skipped"
    )
