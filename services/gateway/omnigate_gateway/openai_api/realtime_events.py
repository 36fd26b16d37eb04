"""OpenAI Realtime (GA) events as JSON, to and from a realtime session's plain events (``realtime.events``);
pure functions, no I/O (``routes/realtime.py`` moves the messages).

Client events taken: ``session.update`` (instructions, voice, output modalities, max output tokens, turn
detection ``server_vad`` or null; the input and output formats must stay ``audio/pcm`` at 24 kHz),
``input_audio_buffer.append`` / ``.commit`` / ``.clear``, ``conversation.item.create`` (a ``message`` of
``input_text`` / ``input_audio`` parts, a system message, or an assistant's text), ``response.create``
(with per-response instructions, voice, output modalities, max output tokens and metadata) and
``response.cancel``. Settings Omnigate cannot honour (tools, semantic VAD, input transcription, noise
reduction, another audio format or speed, out-of-band responses) are refused naming them; bookkeeping ones
(``tracing``, ``truncation``, ``include``) are accepted and ignored. Any other event type gets an ``error``
naming it.

Server events sent: ``session.created`` / ``.updated``, ``input_audio_buffer.speech_started`` /
``.speech_stopped`` / ``.committed`` / ``.cleared``, ``conversation.item.created``, ``response.created``,
``response.output_item.added``, ``response.content_part.added``, ``response.output_text.delta`` or
``response.output_audio_transcript.delta`` and ``response.output_audio.delta`` (base64 16-bit PCM, 24 kHz),
their ``.done`` events, ``response.content_part.done``, ``response.output_item.done``, ``response.done``
(status ``completed``, ``incomplete``, ``cancelled`` or ``failed``) and ``error``.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable
from typing import Any

from omnigate.errors import ErrorCode, quote
from omnigate_gateway.openai_api.requests import model_matches
from omnigate_gateway.realtime.events import (
    AUDIO_RATE,
    AppendAudio,
    AudioCleared,
    AudioCommitted,
    AudioContent,
    AudioDelta,
    CancelResponse,
    ClearAudio,
    ClientEvent,
    CommitAudio,
    CreateItem,
    CreateResponse,
    Error,
    Item,
    ItemCreated,
    OutputItemAdded,
    OutputItemDone,
    OutputModality,
    Response,
    ResponseCreated,
    ResponseDone,
    ResponseOptions,
    ServerEvent,
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
)

PCM_FORMAT = {"type": "audio/pcm", "rate": AUDIO_RATE}
# Known OpenAI client events Omnigate does not serve (answered with an error naming them).
UNSUPPORTED_EVENTS = (
    "conversation.item.retrieve",
    "conversation.item.truncate",
    "conversation.item.delete",
    "output_audio_buffer.clear",
    "transcription_session.update",
)
# An error's kind as OpenAI's error ``type``.
ERROR_TYPES = {
    ErrorCode.INVALID_ARGUMENT: "invalid_request_error",
    ErrorCode.UNAUTHENTICATED: "authentication_error",
    ErrorCode.PERMISSION_DENIED: "permission_error",
    ErrorCode.RESOURCE_EXHAUSTED: "invalid_request_error",
    ErrorCode.UNAVAILABLE: "service_unavailable_error",
    ErrorCode.DEADLINE_EXCEEDED: "timeout_error",
    ErrorCode.INTERNAL: "server_error",
}


class WireError(Exception):
    """A client message that is not an event Omnigate takes; answered with an ``error`` event."""

    def __init__(
        self, message: str, code: str = "invalid_value", param: str | None = None, event_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.code, self.param, self.event_id = message, code, param, event_id


# ---- client events ---------------------------------------------------------------------------------


def client_event(message: str | bytes, model_id: str) -> ClientEvent:
    """One client message as a session event; raises ``WireError`` naming what is wrong."""
    try:
        data = json.loads(message)
    except (ValueError, RecursionError):
        raise WireError(
            "the message is not a JSON object; send one event per message", "invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise WireError("the message is not a JSON object; send one event per message", "invalid_json")
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    kind = data.get("type")
    parse = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parse is None:
        if kind in UNSUPPORTED_EVENTS:
            raise WireError(f"{kind} is not supported by Omnigate", "unsupported_event", "type", event_id)
        raise WireError(
            f"unknown event type {quote(str(kind))}; Omnigate takes {', '.join(_PARSERS)}",
            "unknown_event",
            "type",
            event_id,
        )
    try:
        return parse(data, event_id, model_id)
    except WireError as error:
        error.event_id = event_id
        raise


def _object(value: Any, param: str, required: bool = False) -> dict[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise WireError(f"{param} must be an object", param=param)
    return value


def _known(data: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            name = f"{where}.{key}" if where else key
            raise WireError(f"Unrecognized parameter: {name}", "unknown_parameter", name)


def _string(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise WireError(f"{param} must be a string", param=param)
    return value


def _unsupported(data: dict[str, Any], param: str, where: str, allowed: tuple[Any, ...] = (None,)) -> None:
    value = data.get(param)
    if value not in allowed and value != []:
        name = f"{where}.{param}"
        raise WireError(f"{name} is not supported by Omnigate", "unsupported_parameter", name)


def _modalities(value: Any, param: str) -> tuple[OutputModality, ...]:
    if not isinstance(value, list) or not all(v in ("text", "audio") for v in value):
        raise WireError(f'{param} must be ["audio"] or ["text"]', param=param)
    return tuple(value)


def _max_tokens(value: Any, param: str) -> int | None:
    if value == "inf" or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(f'{param} must be an integer or "inf"', param=param)
    return value


def _pcm_format(value: Any, param: str) -> None:
    if value is None:
        return
    fmt = _object(value, param)
    if fmt.get("type", "audio/pcm") != "audio/pcm" or fmt.get("rate", AUDIO_RATE) != AUDIO_RATE:
        raise WireError(
            f'{param} must be {{"type": "audio/pcm", "rate": {AUDIO_RATE}}} (16-bit PCM, mono, 24 kHz)',
            "unsupported_parameter",
            param,
        )


def _voice(value: Any, param: str) -> str:
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return str(value["id"])
    return _string(value, param)


def _number(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireError(f"{param} must be a number", param=param)
    return float(value)


def _turn_detection(value: Any, param: str) -> TurnDetection | None:
    if value is None:
        return None
    data = _object(value, param)
    kind = data.get("type")
    if kind == "semantic_vad":
        raise WireError(
            f"{param}: semantic_vad is not supported by Omnigate; use server_vad",
            "unsupported_parameter",
            f"{param}.type",
        )
    if kind != "server_vad":
        raise WireError(f'{param}.type must be "server_vad" (or set {param} to null)', param=f"{param}.type")
    _known(
        data,
        {
            "type",
            "threshold",
            "prefix_padding_ms",
            "silence_duration_ms",
            "create_response",
            "interrupt_response",
            "idle_timeout_ms",
        },
        param,
    )
    _unsupported(data, "idle_timeout_ms", param)
    defaults = TurnDetection()
    values: dict[str, Any] = {}
    for name in ("threshold", "prefix_padding_ms", "silence_duration_ms"):
        if data.get(name) is not None:
            number = _number(data[name], f"{param}.{name}")
            values[name] = number if name == "threshold" else int(number)
    for name in ("create_response", "interrupt_response"):
        if data.get(name) is not None:
            if not isinstance(data[name], bool):
                raise WireError(f"{param}.{name} must be true or false", param=f"{param}.{name}")
            values[name] = data[name]
    return TurnDetection(**{**defaults.__dict__, **values})


def _session_update(data: dict[str, Any], event_id: str | None, model_id: str) -> UpdateSession:
    _known(data, {"type", "event_id", "session"}, "")
    session = _object(data.get("session"), "session", required=True)
    _known(
        session,
        {
            "type", "object", "id", "model", "instructions", "output_modalities", "audio", "max_output_tokens",
            "tools", "tool_choice", "tracing", "truncation", "include", "prompt", "expires_at",
        },
        "session",
    )  # fmt: skip
    if session.get("type", "realtime") != "realtime":
        raise WireError(
            f'session.type {quote(str(session.get("type")))} is not supported; Omnigate serves "realtime" sessions',
            "unsupported_parameter",
            "session.type",
        )
    model = session.get("model")
    if model is not None and not model_matches(_string(model, "session.model"), model_id):
        raise WireError(
            f"session.model {quote(model)} is not the served model {model_id}", param="session.model"
        )
    _unsupported(session, "tools", "session")
    _unsupported(session, "prompt", "session")
    _unsupported(session, "tool_choice", "session", (None, "auto", "none"))
    update = UpdateSession(event_id=event_id)
    if session.get("instructions") is not None:
        update.instructions = _string(session["instructions"], "session.instructions")
    if session.get("output_modalities") is not None:
        update.output_modalities = _modalities(session["output_modalities"], "session.output_modalities")
    if "max_output_tokens" in session:
        update.max_output_tokens = _max_tokens(session["max_output_tokens"], "session.max_output_tokens")
    audio = _object(session.get("audio"), "session.audio")
    _known(audio, {"input", "output"}, "session.audio")
    audio_in = _object(audio.get("input"), "session.audio.input")
    _known(audio_in, {"format", "turn_detection", "transcription", "noise_reduction"}, "session.audio.input")
    _pcm_format(audio_in.get("format"), "session.audio.input.format")
    _unsupported(audio_in, "transcription", "session.audio.input")
    _unsupported(audio_in, "noise_reduction", "session.audio.input")
    if "turn_detection" in audio_in:
        update.turn_detection = _turn_detection(
            audio_in["turn_detection"], "session.audio.input.turn_detection"
        )
    audio_out = _object(audio.get("output"), "session.audio.output")
    _known(audio_out, {"format", "voice", "speed"}, "session.audio.output")
    _pcm_format(audio_out.get("format"), "session.audio.output.format")
    _unsupported(audio_out, "speed", "session.audio.output", (None, 1, 1.0))
    if audio_out.get("voice") is not None:
        update.voice = _voice(audio_out["voice"], "session.audio.output.voice")
    return update


def _append(data: dict[str, Any], event_id: str | None, model_id: str) -> AppendAudio:
    _known(data, {"type", "event_id", "audio"}, "")
    return AppendAudio(_base64(data.get("audio"), "audio"), event_id)


def _base64(value: Any, param: str) -> bytes:
    try:
        return base64.b64decode(_string(value, param), validate=True)
    except (binascii.Error, ValueError):
        raise WireError(f"{param} is not valid base64", param=param) from None


def _commit(data: dict[str, Any], event_id: str | None, model_id: str) -> CommitAudio:
    _known(data, {"type", "event_id"}, "")
    return CommitAudio(event_id)


def _clear(data: dict[str, Any], event_id: str | None, model_id: str) -> ClearAudio:
    _known(data, {"type", "event_id"}, "")
    return ClearAudio(event_id)


_TEXT_PARTS = {
    "user": ("input_text",),
    "system": ("input_text",),
    "assistant": ("output_text", "text", "output_audio"),
}


def _item_create(data: dict[str, Any], event_id: str | None, model_id: str) -> CreateItem:
    _known(data, {"type", "event_id", "item", "previous_item_id"}, "")
    item = _object(data.get("item"), "item", required=True)
    _known(item, {"id", "type", "object", "role", "content", "status"}, "item")
    if item.get("type", "message") != "message":
        raise WireError(
            f"item.type {quote(str(item.get('type')))} is not supported; Omnigate takes messages",
            "unsupported_parameter",
            "item.type",
        )
    role = item.get("role")
    if role not in _TEXT_PARTS:
        raise WireError('item.role must be "user", "assistant" or "system"', param="item.role")
    content = item.get("content")
    if not isinstance(content, list):
        raise WireError("item.content must be a list of content parts", param="item.content")
    parts: list[TextContent | AudioContent] = []
    for index, raw in enumerate(content):
        param = f"item.content[{index}]"
        part = _object(raw, param, required=True)
        kind = part.get("type")
        if role == "user" and kind == "input_audio":
            parts.append(AudioContent(_base64(part.get("audio"), f"{param}.audio")))
        elif kind in _TEXT_PARTS[role]:
            key = "transcript" if kind == "output_audio" else "text"
            parts.append(TextContent(_string(part.get(key), f"{param}.{key}")))
        else:
            allowed = ("input_text", "input_audio") if role == "user" else _TEXT_PARTS[role]
            raise WireError(
                f"{param}.type {quote(str(kind))} is not supported in a {role} item; use {' or '.join(allowed)}",
                "unsupported_parameter",
                f"{param}.type",
            )
    previous = data.get("previous_item_id")
    return CreateItem(
        role=role,
        content=parts,
        item_id=_string(item["id"], "item.id") if item.get("id") is not None else None,
        previous_item_id=_string(previous, "previous_item_id") if previous is not None else None,
        event_id=event_id,
    )


def _response_create(data: dict[str, Any], event_id: str | None, model_id: str) -> CreateResponse:
    _known(data, {"type", "event_id", "response"}, "")
    body = _object(data.get("response"), "response")
    _known(
        body,
        {
            "instructions", "output_modalities", "max_output_tokens", "audio", "metadata", "conversation",
            "input", "tools", "tool_choice", "prompt",
        },
        "response",
    )  # fmt: skip
    _unsupported(body, "conversation", "response", (None, "auto"))
    _unsupported(body, "input", "response")
    _unsupported(body, "tools", "response")
    _unsupported(body, "prompt", "response")
    _unsupported(body, "tool_choice", "response", (None, "auto", "none"))
    options: dict[str, Any] = {}
    if body.get("instructions") is not None:
        options["instructions"] = _string(body["instructions"], "response.instructions")
    if body.get("output_modalities") is not None:
        options["output_modalities"] = _modalities(body["output_modalities"], "response.output_modalities")
    if "max_output_tokens" in body:
        options["max_output_tokens"] = _max_tokens(body["max_output_tokens"], "response.max_output_tokens")
    audio = _object(body.get("audio"), "response.audio")
    _known(audio, {"output"}, "response.audio")
    audio_out = _object(audio.get("output"), "response.audio.output")
    _known(audio_out, {"format", "voice"}, "response.audio.output")
    _pcm_format(audio_out.get("format"), "response.audio.output.format")
    if audio_out.get("voice") is not None:
        options["voice"] = _voice(audio_out["voice"], "response.audio.output.voice")
    metadata = body.get("metadata")
    if metadata is not None:
        if (
            not isinstance(metadata, dict)
            or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items()
            )
            or len(metadata) > 16
        ):
            raise WireError(
                "response.metadata must be an object of at most 16 strings (keys up to 64 characters, values up "
                "to 512)",
                param="response.metadata",
            )
        options["metadata"] = dict(metadata)
    return CreateResponse(ResponseOptions(**options), event_id)


def _response_cancel(data: dict[str, Any], event_id: str | None, model_id: str) -> CancelResponse:
    _known(data, {"type", "event_id", "response_id"}, "")
    response_id = data.get("response_id")
    return CancelResponse(_string(response_id, "response_id") if response_id is not None else None, event_id)


_PARSERS: dict[str, Callable[[dict[str, Any], str | None, str], ClientEvent]] = {
    "session.update": _session_update,
    "input_audio_buffer.append": _append,
    "input_audio_buffer.commit": _commit,
    "input_audio_buffer.clear": _clear,
    "conversation.item.create": _item_create,
    "response.create": _response_create,
    "response.cancel": _response_cancel,
}


# ---- server events ---------------------------------------------------------------------------------


def _event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "event_id": f"event_{uuid.uuid4().hex[:24]}", **fields}


def session_object(session_id: str, config: SessionConfig) -> dict[str, Any]:
    """The session as ``session.created`` / ``session.updated`` carry it."""
    turns = config.turn_detection
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": config.model,
        "output_modalities": list(config.output_modalities),
        "instructions": config.instructions,
        "audio": {
            "input": {
                "format": PCM_FORMAT,
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": None
                if turns is None
                else {"type": "server_vad", **turns.__dict__, "idle_timeout_ms": None},
            },
            "output": {"format": PCM_FORMAT, "voice": config.voice, "speed": 1.0},
        },
        "max_output_tokens": config.max_output_tokens or "inf",
        "tools": [],
        "tool_choice": "auto",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "include": None,
    }


def item_object(item: Item) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    for part in item.content:
        if item.role == "assistant":
            if part.kind == "audio":
                content.append({"type": "output_audio", "transcript": part.text})
            else:
                content.append({"type": "output_text", "text": part.text})
        elif part.kind == "audio":
            content.append({"type": "input_audio", "transcript": None})
        else:
            content.append({"type": "input_text", "text": part.text})
    return {
        "id": item.id,
        "object": "realtime.item",
        "type": "message",
        "status": item.status,
        "role": item.role,
        "content": content,
    }


def error_object(error: Error) -> dict[str, Any]:
    return {
        "type": ERROR_TYPES.get(error.kind, "server_error"),
        "code": error.code,
        "message": error.message,
        "param": error.param,
        "event_id": error.event_id,
    }


def response_object(response: Response, session_id: str) -> dict[str, Any]:
    details: dict[str, Any] | None = None
    if response.status in ("cancelled", "incomplete"):
        details = {"type": response.status, "reason": response.reason}
    elif response.status == "failed" and response.error is not None:
        error = error_object(response.error)
        details = {
            "type": "failed",
            "error": {"type": error["type"], "code": error["code"], "message": error["message"]},
        }
    usage = None
    if response.usage is not None:
        u = response.usage
        usage = {
            "input_tokens": u.input_tokens,
            "output_tokens": u.output_tokens,
            "total_tokens": u.input_tokens + u.output_tokens,
        }
    return {
        "object": "realtime.response",
        "id": response.id,
        "status": response.status,
        "status_details": details,
        "output": [item_object(item) for item in response.output],
        "conversation_id": f"conv_{session_id.removeprefix('sess_')}",
        "output_modalities": list(response.output_modalities),
        "max_output_tokens": response.max_output_tokens or "inf",
        "audio": {"output": {"format": PCM_FORMAT, "voice": response.voice}},
        "usage": usage,
        "metadata": response.metadata,
    }


def server_events(event: ServerEvent, session_id: str) -> list[dict[str, Any]]:
    """A session event as the OpenAI events that carry it (``SessionClosed`` has none: the connection
    closes)."""
    match event:
        case SessionCreated():
            return [_event("session.created", session=session_object(event.session_id, event.config))]
        case SessionUpdated():
            return [_event("session.updated", session=session_object(event.session_id, event.config))]
        case SpeechStarted():
            return [
                _event(
                    "input_audio_buffer.speech_started",
                    audio_start_ms=event.audio_start_ms,
                    item_id=event.item_id,
                )
            ]
        case SpeechStopped():
            return [
                _event(
                    "input_audio_buffer.speech_stopped",
                    audio_end_ms=event.audio_end_ms,
                    item_id=event.item_id,
                )
            ]
        case AudioCommitted():
            return [
                _event(
                    "input_audio_buffer.committed",
                    previous_item_id=event.previous_item_id,
                    item_id=event.item_id,
                )
            ]
        case AudioCleared():
            return [_event("input_audio_buffer.cleared")]
        case ItemCreated():
            return [
                _event(
                    "conversation.item.created",
                    previous_item_id=event.previous_item_id,
                    item=item_object(event.item),
                )
            ]
        case ResponseCreated():
            return [_event("response.created", response=response_object(event.response, session_id))]
        case OutputItemAdded():
            return _output_item_added(event)
        case TextDelta():
            kind = (
                "response.output_audio_transcript.delta" if event.transcript else "response.output_text.delta"
            )
            return [_event(kind, **_place(event.response_id, event.item_id), delta=event.text)]
        case AudioDelta():
            data = base64.b64encode(event.pcm).decode()
            return [
                _event("response.output_audio.delta", **_place(event.response_id, event.item_id), delta=data)
            ]
        case OutputItemDone():
            return _output_item_done(event)
        case ResponseDone():
            return [_event("response.done", response=response_object(event.response, session_id))]
        case Error():
            return [_event("error", error=error_object(event))]
        case SessionClosed():
            return []
    return []  # pragma: no cover - every event is matched above


def _place(response_id: str, item_id: str) -> dict[str, Any]:
    return {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}


def _part(item: Item) -> dict[str, Any]:
    part = item.content[0]
    if part.kind == "audio":
        return {"type": "audio", "transcript": part.text}
    return {"type": "text", "text": part.text}


def _output_item_added(event: OutputItemAdded) -> list[dict[str, Any]]:
    item = item_object(event.item)
    return [
        _event("response.output_item.added", response_id=event.response_id, output_index=0, item=item),
        _event("conversation.item.created", previous_item_id=event.previous_item_id, item=item),
        _event(
            "response.content_part.added", **_place(event.response_id, event.item.id), part=_part(event.item)
        ),
    ]


def _output_item_done(event: OutputItemDone) -> list[dict[str, Any]]:
    place = _place(event.response_id, event.item.id)
    part = event.item.content[0]
    if part.kind == "audio":
        done = [
            _event("response.output_audio.done", **place),
            _event("response.output_audio_transcript.done", **place, transcript=part.text),
        ]
    else:
        done = [_event("response.output_text.done", **place, text=part.text)]
    return [
        *done,
        _event("response.content_part.done", **place, part=_part(event.item)),
        _event(
            "response.output_item.done",
            response_id=event.response_id,
            output_index=0,
            item=item_object(event.item),
        ),
    ]
