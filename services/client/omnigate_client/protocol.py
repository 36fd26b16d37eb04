"""Between the SDK's Python shapes and the gateway's protobuf messages (shared by the sync and async clients).

Messages use Hugging Face's chat shape: ``{"role": "user", "content": [parts]}`` or string content. A media
part gives its source as ``url`` (http, https, data:), as ``path`` (a local file: read here and sent
inline), or as raw ``data`` bytes; ``{"type": "image", "image": "https://..."}`` works too.

A Converse conversation's messages are built by the ``*_request`` functions below (``Conversation`` and
``AsyncConversation`` send them) and its events read by ``converse_event_from_proto``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from enum import StrEnum
from typing import Any

import numpy as np

from omnigate.conversation import GenerationMode
from omnigate.enums import PUBLIC_FINISH_REASONS, PUBLIC_MODALITIES, PUBLIC_MODES
from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate_client.types import (
    CONVERSE_SAMPLE_RATE,
    AudioChunk,
    AudioCleared,
    AudioCommitted,
    ConversationItem,
    ConversationResponse,
    ConversationSession,
    ConverseEvent,
    Event,
    EventRefused,
    Image,
    ItemContent,
    ItemCreated,
    ModelInfo,
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
    Summary,
    TextDelta,
    Timings,
    TurnDetection,
    Usage,
)

MODES = {mode.value: PUBLIC_MODES.to_proto(mode) for mode in GenerationMode}


def _name(member: StrEnum | None, unknown: str) -> str:
    """A proto enum value as the SDK's string: the member's name ("audio", "stop"), or ``unknown`` for a
    value a newer gateway may send that this SDK does not know."""
    return member.value if member is not None else unknown


REMOTE_SCHEMES = ("http://", "https://", "data:")
MEDIA_KINDS = ("image", "audio", "video")


def media_part(kind: str, source: str | bytes | pathlib.Path) -> dict:
    """A content part for a URL, a local path (read by the client) or raw bytes."""
    if kind not in MEDIA_KINDS:
        raise ValueError(f"unknown media kind {kind!r}; use image, audio or video")
    if isinstance(source, bytes):
        return {"type": kind, "data": source}
    if isinstance(source, str) and source.startswith(REMOTE_SCHEMES):
        return {"type": kind, "url": source}
    return {"type": kind, "path": str(source)}


def build_request(
    messages: list[dict],
    *,
    generation_mode: str = "text",
    max_new_tokens: int | None = None,
    min_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    return_full_text: bool = False,
    fps: float | None = None,
    load_audio_from_video: bool = False,
    speaker: str | None = None,
) -> pb.GenerateRequest:
    """The ``GenerateRequest`` for these arguments (local files are read here; ValueError/OSError on bad
    input that can be caught before sending)."""
    if generation_mode not in MODES:
        raise ValueError(f"generation_mode must be one of {', '.join(MODES)}; got {generation_mode!r}")
    if isinstance(stop, str):
        stop = [stop]
    params = pb.GenerationParameters(
        max_new_tokens=max_new_tokens or 0,
        min_new_tokens=min_new_tokens or 0,
        do_sample=do_sample,
        stop=stop or [],
    )
    for name, value in (
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("repetition_penalty", repetition_penalty),
        ("seed", seed),
    ):
        if value is not None:
            setattr(params, name, value)
    return pb.GenerateRequest(
        messages=[_message(m) for m in messages],
        parameters=params,
        generation_mode=MODES[generation_mode],
        return_full_text=return_full_text,
        video=pb.VideoOptions(fps=fps or 0.0, load_audio_from_video=load_audio_from_video),
        speaker=speaker or "",
    )


def _message(message: dict) -> pb.Message:
    if not isinstance(message, dict):
        raise ValueError(f"a message is a dict with 'role' and 'content'; got {type(message).__name__}")
    content = message.get("content", [])
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    return pb.Message(role=message.get("role", "user"), content=[_part(p) for p in content])


def _part(part: dict) -> pb.ContentPart:
    if isinstance(part, str):
        return pb.ContentPart(text=part)
    kind = part.get("type")
    if kind == "text":
        return pb.ContentPart(text=part.get("text", ""))
    if kind not in MEDIA_KINDS:
        raise ValueError(f"unknown content part type {kind!r}; use text, image, audio or video")
    inline: Any = part.get(kind)  # a URL or path (str, Path), bytes, or missing: checked below
    if "url" in part or (isinstance(inline, str) and inline.startswith(REMOTE_SCHEMES)):
        source = pb.MediaSource(url=part.get("url") or inline)
    elif "path" in part or isinstance(inline, (str, pathlib.Path)):
        path = pathlib.Path(part.get("path") or inline)
        source = pb.MediaSource(inline=pb.InlineMedia(data=path.read_bytes()))  # read here, sent inline
    elif "data" in part or isinstance(inline, bytes):
        source = pb.MediaSource(
            inline=pb.InlineMedia(data=part.get("data") or inline, mime_type=part.get("mime_type", ""))
        )
    else:
        raise ValueError(f"{kind} part needs a url, path or data")
    content = pb.ContentPart()
    getattr(content, kind).CopyFrom(source)  # the oneof's image, audio or video field
    return content


def event_from_proto(event: pb.GenerateResponse) -> Event:
    kind = event.WhichOneof("event")
    if kind == "text":
        return TextDelta(event.text.text)
    if kind == "audio":
        a = event.audio
        return AudioChunk(a.pcm, a.sample_rate, a.channels or 1, a.sequence)
    if kind == "image":
        i = event.image
        return Image(i.data, i.mime_type, i.width, i.height)
    s = event.summary
    t = s.timings
    return Summary(
        finish_reason=_name(PUBLIC_FINISH_REASONS.get(s.finish_reason), "unspecified"),
        prompt_tokens=s.prompt_tokens,
        output_tokens=s.output_tokens,
        audio_seconds=s.audio_seconds,
        model_id=s.model_id,
        timings=Timings(
            media_s=t.media_s,
            queue_s=t.queue_s,
            time_to_first_output_s=t.time_to_first_output_s,
            generate_s=t.generate_s,
            total_s=t.total_s,
        ),
    )


def model_info_from_proto(info: pb.GetModelInfoResponse) -> ModelInfo:
    limits = info.limits
    return ModelInfo(
        model_id=info.model_id,
        architecture=info.architecture,
        input_modalities=[_name(PUBLIC_MODALITIES.get(m), str(m)) for m in info.input_modalities],
        output_modalities=[_name(PUBLIC_MODALITIES.get(m), str(m)) for m in info.output_modalities],
        input_audio_sample_rate=info.input_audio_sample_rate,
        output_audio_sample_rate=info.output_audio_sample_rate,
        speakers=list(info.speakers),
        limits={f.name: getattr(limits, f.name) for f in limits.DESCRIPTOR.fields},
    )


CONVERSE_MODES = ("audio", "text")  # what a conversation's answers are made of


def pcm16(audio: bytes | bytearray | memoryview | np.ndarray) -> bytes:
    """Mono audio at 24 kHz as the 16-bit little-endian PCM a conversation takes: bytes are taken as they
    are, an int16 array as its samples, a float array as samples in [-1, 1] (clipped)."""
    if isinstance(audio, bytes | bytearray | memoryview):
        data = bytes(audio)
    elif isinstance(audio, np.ndarray):
        if audio.ndim != 1:
            raise ValueError(f"audio must be mono (one dimension); got shape {audio.shape}")
        if audio.dtype == np.int16:
            data = audio.astype("<i2", copy=False).tobytes()
        elif np.issubdtype(audio.dtype, np.floating):
            data = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        else:
            raise ValueError(f"audio arrays must be int16 or float; got {audio.dtype}")
    else:
        raise ValueError(f"audio must be bytes (16-bit PCM) or a numpy array; got {type(audio).__name__}")
    if len(data) % 2:
        raise ValueError(f"16-bit PCM has an even number of bytes; got {len(data)}")
    return data


def _mode(output_mode: str) -> pb.GenerationMode:
    if output_mode not in CONVERSE_MODES:
        raise ValueError(
            f"output_mode must be 'audio' (speech and its transcript) or 'text'; got {output_mode!r}"
        )
    return MODES[output_mode]


def session_update_request(
    *,
    instructions: str | None = None,
    voice: str | None = None,
    output_mode: str | None = None,
    turn_detection: TurnDetection | bool | None = None,
    max_output_tokens: int | None = None,
    event_id: str | None = None,
) -> pb.ConverseRequest:
    """``SessionUpdate``: None leaves a setting as it is; ``turn_detection`` False is manual turns, True
    server VAD with its defaults; ``max_output_tokens`` 0 is the gateway's default."""
    update = pb.SessionUpdate()
    if instructions is not None:
        update.instructions = instructions
    if voice is not None:
        update.voice = voice
    if output_mode is not None:
        update.generation_mode = _mode(output_mode)
    if turn_detection is False:
        update.turn_detection.type = pb.TURN_DETECTION_TYPE_NONE
    elif turn_detection is not None:
        settings = TurnDetection() if turn_detection is True else turn_detection
        update.turn_detection.CopyFrom(
            pb.TurnDetection(type=pb.TURN_DETECTION_TYPE_SERVER_VAD, **dataclasses.asdict(settings))
        )
    if max_output_tokens is not None:
        update.max_output_tokens = max_output_tokens
    return pb.ConverseRequest(event_id=event_id or "", session_update=update)


def opening_request(
    instructions: str | None,
    voice: str | None,
    output_mode: str | None,
    turn_detection: TurnDetection | bool | None,
    max_output_tokens: int | None,
) -> pb.ConverseRequest | None:
    """The ``SessionUpdate`` a conversation opens with, when ``converse()`` was given settings."""
    settings = (instructions, voice, output_mode, turn_detection, max_output_tokens)
    if all(value is None for value in settings):
        return None
    return session_update_request(
        instructions=instructions,
        voice=voice,
        output_mode=output_mode,
        turn_detection=turn_detection,
        max_output_tokens=max_output_tokens,
    )


def audio_append_request(audio: bytes | np.ndarray, event_id: str | None = None) -> pb.ConverseRequest:
    return pb.ConverseRequest(
        event_id=event_id or "", input_audio_append=pb.InputAudioAppend(pcm=pcm16(audio))
    )


def audio_commit_request(event_id: str | None = None) -> pb.ConverseRequest:
    return pb.ConverseRequest(event_id=event_id or "", input_audio_commit=pb.InputAudioCommit())


def audio_clear_request(event_id: str | None = None) -> pb.ConverseRequest:
    return pb.ConverseRequest(event_id=event_id or "", input_audio_clear=pb.InputAudioClear())


def item_create_request(
    text: str | None = None,
    audio: bytes | np.ndarray | None = None,
    *,
    role: str = "user",
    item_id: str | None = None,
    previous_item_id: str | None = None,
    event_id: str | None = None,
) -> pb.ConverseRequest:
    """``ItemCreate``: a message of the audio (24 kHz mono), then the text."""
    content = []
    if audio is not None:
        content.append(pb.InputContent(audio_pcm=pcm16(audio)))
    if text is not None:
        content.append(pb.InputContent(text=text))
    if not content:
        raise ValueError("an item needs text, audio or both")
    item = pb.ItemCreate(
        role=role, content=content, item_id=item_id or "", previous_item_id=previous_item_id or ""
    )
    return pb.ConverseRequest(event_id=event_id or "", item_create=item)


def response_create_request(
    *,
    instructions: str | None = None,
    voice: str | None = None,
    output_mode: str | None = None,
    max_output_tokens: int | None = None,
    metadata: dict[str, str] | None = None,
    event_id: str | None = None,
) -> pb.ConverseRequest:
    """``ResponseCreate``: None takes the session's setting for this answer."""
    create = pb.ResponseCreate(metadata=metadata or {})
    if instructions is not None:
        create.instructions = instructions
    if voice is not None:
        create.voice = voice
    if output_mode is not None:
        create.generation_mode = _mode(output_mode)
    if max_output_tokens is not None:
        create.max_output_tokens = max_output_tokens
    return pb.ConverseRequest(event_id=event_id or "", response_create=create)


def response_cancel_request(
    response_id: str | None = None, event_id: str | None = None
) -> pb.ConverseRequest:
    cancel = pb.ResponseCancel(response_id=response_id or "")
    return pb.ConverseRequest(event_id=event_id or "", response_cancel=cancel)


def _mode_name(number: pb.GenerationMode) -> str:
    return _name(PUBLIC_MODES.get(number), "unspecified")


def _enum_name(enum: Any, number: int, prefix: str) -> str:
    """``ITEM_STATUS_IN_PROGRESS`` as "in_progress" ("unspecified" for a value this SDK does not know)."""
    try:
        return str(enum.Name(number)).removeprefix(prefix).lower()
    except ValueError:
        return "unspecified"


def _session(message: pb.RealtimeSession) -> ConversationSession:
    turns = message.turn_detection
    detection = None
    if turns.type == pb.TURN_DETECTION_TYPE_SERVER_VAD:
        detection = TurnDetection(
            threshold=round(turns.threshold, 6),
            prefix_padding_ms=turns.prefix_padding_ms,
            silence_duration_ms=turns.silence_duration_ms,
            create_response=turns.create_response,
            interrupt_response=turns.interrupt_response,
        )
    return ConversationSession(
        id=message.id,
        model=message.model,
        voice=message.voice,
        output_mode=_mode_name(message.generation_mode),
        instructions=message.instructions,
        turn_detection=detection,
        max_output_tokens=message.max_output_tokens or None,
        sample_rate=message.audio_sample_rate or CONVERSE_SAMPLE_RATE,
    )


def _item(message: pb.RealtimeItem) -> ConversationItem:
    content = []
    for part in message.content:
        if part.WhichOneof("content") == "audio":
            content.append(ItemContent("audio", part.audio.transcript, part.audio.duration_ms))
        else:
            content.append(ItemContent("text", part.text))
    status = _enum_name(pb.ItemStatus, message.status, "ITEM_STATUS_")
    return ConversationItem(message.id, message.role, content, status)


def _response(message: pb.RealtimeResponse) -> ConversationResponse:
    usage = None
    if message.HasField("usage"):
        usage = Usage(message.usage.input_tokens, message.usage.output_tokens)
    return ConversationResponse(
        id=message.id,
        status=_enum_name(pb.ResponseStatus, message.status, "RESPONSE_STATUS_"),
        reason=message.reason or None,
        message=message.message or None,
        output_mode=_mode_name(message.generation_mode),
        voice=message.voice,
        max_output_tokens=message.max_output_tokens or None,
        metadata=dict(message.metadata),
        output=[_item(item) for item in message.output],
        usage=usage,
    )


def converse_event_from_proto(message: pb.ConverseResponse) -> ConverseEvent | None:
    """A ``ConverseResponse`` as the SDK's event; None for an event a newer gateway sends that this SDK does
    not know (skipped)."""
    kind = message.WhichOneof("event")
    if kind == "session_created":
        return SessionCreated(_session(message.session_created))
    if kind == "session_updated":
        return SessionUpdated(_session(message.session_updated))
    if kind == "speech_started":
        return SpeechStarted(message.speech_started.audio_start_ms, message.speech_started.item_id)
    if kind == "speech_stopped":
        return SpeechStopped(message.speech_stopped.audio_end_ms, message.speech_stopped.item_id)
    if kind == "input_audio_committed":
        committed = message.input_audio_committed
        return AudioCommitted(committed.item_id, committed.previous_item_id or None)
    if kind == "input_audio_cleared":
        return AudioCleared()
    if kind == "item_created":
        return ItemCreated(_item(message.item_created.item), message.item_created.previous_item_id or None)
    if kind == "response_created":
        return ResponseCreated(_response(message.response_created))
    if kind == "output_item_added":
        added = message.output_item_added
        return OutputItemAdded(added.response_id, _item(added.item), added.previous_item_id or None)
    if kind == "output_text_delta":
        delta = message.output_text_delta
        return OutputTextDelta(delta.response_id, delta.item_id, delta.text, delta.transcript)
    if kind == "output_audio_delta":
        audio = message.output_audio_delta
        chunk = audio.audio
        return OutputAudioDelta(
            audio.response_id,
            audio.item_id,
            AudioChunk(
                chunk.pcm, chunk.sample_rate or CONVERSE_SAMPLE_RATE, chunk.channels or 1, chunk.sequence
            ),
        )
    if kind == "output_item_done":
        return OutputItemDone(message.output_item_done.response_id, _item(message.output_item_done.item))
    if kind == "response_done":
        return ResponseDone(_response(message.response_done))
    if kind == "event_refused":
        refused = message.event_refused
        return EventRefused(refused.message, refused.reason, refused.field or None, refused.event_id or None)
    return None
