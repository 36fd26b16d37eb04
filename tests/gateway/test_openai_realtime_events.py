"""OpenAI Realtime JSON events to and from the session's plain events (``openai_api/realtime_events.py``):
what each client event becomes, what is refused and how the error names it, and the shapes the openai SDK
parses the server events into."""

from __future__ import annotations

import base64
import json

import pytest
from openai.types.realtime.realtime_server_event import RealtimeServerEvent
from pydantic import TypeAdapter

from omnigate_gateway.openai_api.realtime_events import WireError, client_event, server_events
from omnigate_gateway.realtime.events import (
    UNCHANGED,
    AppendAudio,
    AudioContent,
    CancelResponse,
    ClearAudio,
    CommitAudio,
    ContentPart,
    CreateItem,
    CreateResponse,
    Error,
    Item,
    OutputItemAdded,
    OutputItemDone,
    Response,
    ResponseDone,
    SessionConfig,
    SessionCreated,
    TextContent,
    TextDelta,
    TurnDetection,
    UpdateSession,
    Usage,
)

MODEL = "models/tiny-qwen2.5-omni"


def _parse(**event) -> object:
    return client_event(json.dumps(event), MODEL)


def test_session_update():
    update = _parse(
        type="session.update",
        event_id="evt_1",
        session={
            "type": "realtime",
            "model": "tiny-qwen2.5-omni",
            "instructions": "Be brief.",
            "output_modalities": ["text"],
            "max_output_tokens": "inf",
            "tracing": "auto",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "turn_detection": {"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 800},
                },
                "output": {"voice": "ethan", "speed": 1.0},
            },
        },
    )
    assert update == UpdateSession(
        instructions="Be brief.",
        voice="ethan",
        output_modalities=("text",),
        turn_detection=TurnDetection(threshold=0.6, silence_duration_ms=800),
        max_output_tokens=None,
        event_id="evt_1",
    )
    off = _parse(type="session.update", session={"audio": {"input": {"turn_detection": None}}})
    assert off.turn_detection is None and off.voice is UNCHANGED and off.max_output_tokens is UNCHANGED


def test_the_other_client_events():
    pcm = b"\x01\x00\x02\x00"
    assert _parse(type="input_audio_buffer.append", audio=base64.b64encode(pcm).decode()) == AppendAudio(pcm)
    assert _parse(type="input_audio_buffer.commit", event_id="e") == CommitAudio("e")
    assert _parse(type="input_audio_buffer.clear") == ClearAudio()
    item = _parse(
        type="conversation.item.create",
        previous_item_id="item_a",
        item={
            "id": "item_b",
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Hi"},
                {"type": "input_audio", "audio": base64.b64encode(pcm).decode()},
            ],
        },
    )
    assert item == CreateItem("user", [TextContent("Hi"), AudioContent(pcm)], "item_b", "item_a")
    said = _parse(
        type="conversation.item.create",
        item={
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_audio", "transcript": "Yo"}],
        },
    )
    assert said.content == [TextContent("Yo")]
    response = _parse(
        type="response.create",
        response={
            "instructions": "Shout.",
            "max_output_tokens": 7,
            "audio": {"output": {"voice": {"id": "Chelsie"}}},
            "metadata": {"turn": "2"},
            "conversation": "auto",
        },
    )
    assert isinstance(response, CreateResponse)
    options = response.options
    assert (options.instructions, options.max_output_tokens, options.voice) == ("Shout.", 7, "Chelsie")
    assert options.metadata == {"turn": "2"} and options.output_modalities is None
    assert _parse(type="response.create").options.max_output_tokens is UNCHANGED
    assert _parse(type="response.cancel", response_id="resp_1") == CancelResponse("resp_1")


@pytest.mark.parametrize(
    ("event", "code", "param", "says"),
    [
        ({"type": "made.up"}, "unknown_event", "type", "made.up"),
        ({"type": "conversation.item.truncate"}, "unsupported_event", "type", "conversation.item.truncate"),
        ({"type": "input_audio_buffer.append", "audio": "%%%"}, "invalid_value", "audio", "base64"),
        ({"type": "input_audio_buffer.commit", "extra": 1}, "unknown_parameter", "extra", "extra"),
        (
            {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}},
            "unsupported_parameter",
            "session.audio.input.format",
            "audio/pcm",
        ),
        (
            {
                "type": "session.update",
                "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
            },
            "unsupported_parameter",
            "session.audio.input.turn_detection.type",
            "semantic_vad",
        ),
        (
            {
                "type": "session.update",
                "session": {"audio": {"input": {"transcription": {"model": "whisper-1"}}}},
            },
            "unsupported_parameter",
            "session.audio.input.transcription",
            "not supported",
        ),
        (
            {"type": "session.update", "session": {"tools": [{"type": "function", "name": "f"}]}},
            "unsupported_parameter",
            "session.tools",
            "not supported",
        ),
        (
            {"type": "session.update", "session": {"model": "gpt-realtime"}},
            "invalid_value",
            "session.model",
            "served",
        ),
        (
            {"type": "session.update", "session": {"type": "transcription"}},
            "unsupported_parameter",
            "session.type",
            "realtime",
        ),
        (
            {"type": "response.create", "response": {"conversation": "none"}},
            "unsupported_parameter",
            "response.conversation",
            "",
        ),
        (
            {
                "type": "conversation.item.create",
                "item": {"type": "function_call", "role": "user", "content": []},
            },
            "unsupported_parameter",
            "item.type",
            "messages",
        ),
        (
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_image", "image_url": "x"}],
                },
            },
            "unsupported_parameter",
            "item.content[0].type",
            "input_text or input_audio",
        ),
    ],
)
def test_refusals_name_what_is_wrong(event, code, param, says):
    event = {**event, "event_id": "evt_9"}
    with pytest.raises(WireError) as refused:
        client_event(json.dumps(event), MODEL)
    error = refused.value
    assert (error.code, error.param, error.event_id) == (code, param, "evt_9")
    assert says in error.message


def test_a_message_that_is_not_a_json_object():
    for message in ("not json", "[1, 2]", b"\xff"):
        with pytest.raises(WireError) as refused:
            client_event(message, MODEL)
        assert refused.value.code == "invalid_json"


def _sdk(events: list[dict]) -> list:
    """The server events as the openai SDK's own types (it parses with these)."""
    return [TypeAdapter(RealtimeServerEvent).validate_python(event) for event in events]


def test_server_events_parse_as_the_sdks_types():
    config = SessionConfig(model=MODEL, voice="Chelsie", output_modalities=("audio",))
    created = _sdk(server_events(SessionCreated("sess_1", config), "sess_1"))[0]
    assert created.session.audio.output.voice == "Chelsie"
    assert created.session.audio.input.turn_detection.silence_duration_ms == 500
    item = Item("item_2", "assistant", [ContentPart("audio", text="Hel")], "in_progress")
    added = _sdk(server_events(OutputItemAdded("resp_1", item, "item_1"), "sess_1"))
    assert [e.type for e in added] == [
        "response.output_item.added",
        "conversation.item.created",
        "response.content_part.added",
    ]
    assert added[1].previous_item_id == "item_1" and added[1].item.content[0].type == "output_audio"
    delta = _sdk(server_events(TextDelta("resp_1", "item_2", "lo", transcript=True), "sess_1"))[0]
    assert delta.type == "response.output_audio_transcript.delta" and delta.delta == "lo"
    item.content[0].text, item.status = "Hello", "incomplete"
    done = _sdk(server_events(OutputItemDone("resp_1", item), "sess_1"))
    assert [e.type for e in done] == [
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert done[1].transcript == "Hello"
    response = Response("resp_1", ("audio",), "Chelsie", None, status="cancelled", reason="turn_detected")
    response.output, response.usage = [item], Usage(10, 3)
    finished = _sdk(server_events(ResponseDone(response), "sess_1"))[0].response
    assert finished.status == "cancelled" and finished.status_details.reason == "turn_detected"
    assert finished.usage.total_tokens == 13 and finished.output[0].content[0].transcript == "Hello"
    error = _sdk(server_events(Error("no", "unknown_event", param="type", event_id="e1"), "sess_1"))[0]
    assert error.error.type == "invalid_request_error" and error.error.event_id == "e1"
