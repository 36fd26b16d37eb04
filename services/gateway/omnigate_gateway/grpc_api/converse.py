"""``GatewayService.Converse``: the realtime conversation (``realtime.RealtimeSession``) over a gRPC bidi stream.

The conversions between ``ConverseRequest`` / ``ConverseResponse`` and the session's plain events
(``client_event``, ``server_message``) are pure functions; ``converse`` moves the messages, in the same shape
as the WebSocket door (``openai_api/routes/realtime.py``): one task reads client messages into the session,
answering a message it cannot take with an ``event_refused`` (the conversation goes on); another writes the
session's events out. The call's API key and the served model are checked before the session opens
(refused with the gRPC status, like ``Generate``).

How it ends (documented on the RPC in ``gateway.proto``):

- the client half-closes: nothing more is read; the running answer, if any, finishes
  (``RealtimeSession.end_input``), every queued event is written, then the stream ends with OK;
- the client cancels or disconnects: gRPC cancels this handler, and closing the session cancels the running
  answer and so its worker call;
- the session closes itself (idle past ``realtime_idle_timeout_s``): the stream ends with the status of the
  error it gave (DEADLINE_EXCEEDED), not with an ``event_refused``.

The call's own deadline bounds the whole conversation (gRPC enforces it); each answer gets the gateway's
default timeout, as on the WebSocket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterable
from typing import Any, Literal

import grpc

from omnigate import status, tracing
from omnigate.errors import (
    DeadlineExceeded,
    ErrorCode,
    InternalError,
    LimitExceeded,
    OmnigateError,
    Unavailable,
    quote,
)
from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate.grpc_server import Undecodable
from omnigate_gateway.core import Call, GatewayCore
from omnigate_gateway.realtime.events import (
    AUDIO_RATE,
    UNCHANGED,
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
from omnigate_gateway.realtime.session import RealtimeSession

log = logging.getLogger(__name__)

ConverseContext = grpc.aio.ServicerContext[Any, Any]
Role = Literal["user", "assistant", "system"]

ROLES: dict[str, Role] = {"user": "user", "assistant": "assistant", "system": "system"}
MAX_METADATA = (16, 64, 512)  # entries, key characters, value characters (OpenAI's response metadata)
_MODALITIES: dict[int, tuple[OutputModality, ...]] = {
    gw.GENERATION_MODE_TEXT: ("text",),
    gw.GENERATION_MODE_AUDIO: ("audio",),
}
# The error a session closed itself with, as the status that ends the stream.
_CLOSING_ERRORS: dict[ErrorCode, type[OmnigateError]] = {
    ErrorCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    ErrorCode.UNAVAILABLE: Unavailable,
    ErrorCode.RESOURCE_EXHAUSTED: LimitExceeded,
}
# The session's names for settings that the proto names otherwise.
_FIELD_NAMES = {"output_modalities": "generation_mode", "item.id": "item_id", "audio": "pcm"}


class Refusal(Exception):
    """A client message that is not an event the session takes; answered with ``event_refused``."""

    def __init__(
        self, message: str, code: str = "invalid_value", field: str | None = None, event_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.code, self.field, self.event_id = message, code, field, event_id


# ---- client messages -------------------------------------------------------------------------------


def client_event(message: gw.ConverseRequest | Undecodable) -> ClientEvent:
    """One ``ConverseRequest`` as a session event; raises ``Refusal`` naming what is wrong."""
    if isinstance(message, Undecodable):
        raise Refusal(message.message, "invalid_message")
    event_id = message.event_id or None
    kind = message.WhichOneof("event")
    try:
        match kind:
            case "session_update":
                return _session_update(message.session_update, event_id)
            case "input_audio_append":
                return AppendAudio(message.input_audio_append.pcm, event_id)
            case "input_audio_commit":
                return CommitAudio(event_id)
            case "input_audio_clear":
                return ClearAudio(event_id)
            case "item_create":
                return _item_create(message.item_create, event_id)
            case "response_create":
                return _response_create(message.response_create, event_id)
            case "response_cancel":
                return CancelResponse(message.response_cancel.response_id or None, event_id)
    except Refusal as refusal:
        refusal.event_id = event_id
        raise
    events = ", ".join(field.name for field in gw.ConverseRequest.DESCRIPTOR.oneofs_by_name["event"].fields)
    raise Refusal(
        f"the message carries no event this gateway knows (none set, or one from a newer API version); "
        f"set one of {events}",
        "unknown_event",
        "event",
        event_id,
    )


def _modalities(mode: int, field: str) -> tuple[OutputModality, ...]:
    modalities = _MODALITIES.get(mode)
    if modalities is None:
        name = gw.GenerationMode.Name(mode) if mode in gw.GenerationMode.values() else str(mode)
        raise Refusal(
            f"{field} is {name}; a conversation answers in GENERATION_MODE_AUDIO (speech and its "
            "transcript) or GENERATION_MODE_TEXT",
            field=field,
        )
    return modalities


def _turn_detection(message: gw.TurnDetection) -> TurnDetection | None:
    if message.type == gw.TURN_DETECTION_TYPE_NONE:
        return None
    if message.type != gw.TURN_DETECTION_TYPE_SERVER_VAD:
        raise Refusal(
            "session_update.turn_detection.type must be TURN_DETECTION_TYPE_SERVER_VAD or "
            "TURN_DETECTION_TYPE_NONE (manual turns)",
            field="session_update.turn_detection.type",
        )
    values: dict[str, Any] = {}
    for name in (
        "threshold",
        "prefix_padding_ms",
        "silence_duration_ms",
        "create_response",
        "interrupt_response",
    ):
        if message.HasField(name):
            value = getattr(message, name)
            values[name] = round(value, 6) if name == "threshold" else value  # float32 0.3 is 0.30000001
    return TurnDetection(**values)


def _session_update(message: gw.SessionUpdate, event_id: str | None) -> UpdateSession:
    update = UpdateSession(event_id=event_id)
    if message.HasField("instructions"):
        update.instructions = message.instructions
    if message.HasField("voice"):
        update.voice = message.voice
    if message.HasField("generation_mode"):
        update.output_modalities = _modalities(message.generation_mode, "session_update.generation_mode")
    if message.HasField("turn_detection"):
        update.turn_detection = _turn_detection(message.turn_detection)
    if message.HasField("max_output_tokens"):
        update.max_output_tokens = message.max_output_tokens or None
    return update


def _item_create(message: gw.ItemCreate, event_id: str | None) -> CreateItem:
    role = ROLES.get(message.role)
    if role is None:
        raise Refusal(
            f'item_create.role is {quote(message.role)}; it must be "user", "assistant" or "system"',
            field="item_create.role",
        )
    content: list[TextContent | AudioContent] = []
    for index, part in enumerate(message.content):
        kind = part.WhichOneof("content")
        if kind == "text":
            content.append(TextContent(part.text))
        elif kind == "audio_pcm":
            content.append(AudioContent(part.audio_pcm))
        else:
            raise Refusal(
                f"item_create.content[{index}] is empty; set text or audio_pcm",
                field=f"item_create.content[{index}]",
            )
    return CreateItem(
        role=role,
        content=content,
        item_id=message.item_id or None,
        previous_item_id=message.previous_item_id or None,
        event_id=event_id,
    )


def _response_create(message: gw.ResponseCreate, event_id: str | None) -> CreateResponse:
    options = ResponseOptions(
        instructions=message.instructions if message.HasField("instructions") else None,
        voice=message.voice if message.HasField("voice") else None,
        output_modalities=_modalities(message.generation_mode, "response_create.generation_mode")
        if message.HasField("generation_mode")
        else None,
        max_output_tokens=(message.max_output_tokens or None)
        if message.HasField("max_output_tokens")
        else UNCHANGED,
        metadata=_metadata(message.metadata) or None,
    )
    return CreateResponse(options, event_id)


def _metadata(metadata: Any) -> dict[str, str]:
    entries, key_limit, value_limit = MAX_METADATA
    if len(metadata) > entries or any(
        len(k) > key_limit or len(v) > value_limit for k, v in metadata.items()
    ):
        raise Refusal(
            f"response_create.metadata must hold at most {entries} entries, keys up to {key_limit} characters "
            f"and values up to {value_limit}",
            field="response_create.metadata",
        )
    return dict(metadata)


# ---- server events ---------------------------------------------------------------------------------


def server_message(event: ServerEvent, audio_sequence: int = 0) -> gw.ConverseResponse | None:
    """A session event as the ``ConverseResponse`` that carries it (None for ``SessionClosed``, which ends the
    stream instead). ``audio_sequence`` numbers an ``AudioDelta``'s chunk within its answer."""
    match event:
        case SessionCreated():
            return gw.ConverseResponse(session_created=session_message(event.session_id, event.config))
        case SessionUpdated():
            return gw.ConverseResponse(session_updated=session_message(event.session_id, event.config))
        case SpeechStarted():
            started = gw.SpeechStarted(audio_start_ms=event.audio_start_ms, item_id=event.item_id)
            return gw.ConverseResponse(speech_started=started)
        case SpeechStopped():
            stopped = gw.SpeechStopped(audio_end_ms=event.audio_end_ms, item_id=event.item_id)
            return gw.ConverseResponse(speech_stopped=stopped)
        case AudioCommitted():
            committed = gw.InputAudioCommitted(
                item_id=event.item_id, previous_item_id=event.previous_item_id or ""
            )
            return gw.ConverseResponse(input_audio_committed=committed)
        case AudioCleared():
            return gw.ConverseResponse(input_audio_cleared=gw.InputAudioCleared())
        case ItemCreated():
            created = gw.ItemCreated(
                item=item_message(event.item), previous_item_id=event.previous_item_id or ""
            )
            return gw.ConverseResponse(item_created=created)
        case ResponseCreated():
            return gw.ConverseResponse(response_created=response_message(event.response))
        case OutputItemAdded():
            added = gw.OutputItemAdded(
                response_id=event.response_id,
                item=item_message(event.item),
                previous_item_id=event.previous_item_id or "",
            )
            return gw.ConverseResponse(output_item_added=added)
        case TextDelta():
            delta = gw.OutputTextDelta(
                response_id=event.response_id,
                item_id=event.item_id,
                text=event.text,
                transcript=event.transcript,
            )
            return gw.ConverseResponse(output_text_delta=delta)
        case AudioDelta():
            chunk = gw.AudioChunk(
                pcm=event.pcm,
                sample_rate=AUDIO_RATE,
                channels=1,
                encoding=gw.AUDIO_ENCODING_PCM_S16LE,
                sequence=audio_sequence,
            )
            audio = gw.OutputAudioDelta(response_id=event.response_id, item_id=event.item_id, audio=chunk)
            return gw.ConverseResponse(output_audio_delta=audio)
        case OutputItemDone():
            done = gw.OutputItemDone(response_id=event.response_id, item=item_message(event.item))
            return gw.ConverseResponse(output_item_done=done)
        case ResponseDone():
            return gw.ConverseResponse(response_done=response_message(event.response))
        case Error():
            return gw.ConverseResponse(event_refused=refusal_message(event))
        case SessionClosed():
            return None
    raise TypeError(f"not a realtime server event: {event!r}")  # pragma: no cover - all are matched above


def _mode(modalities: tuple[OutputModality, ...]) -> gw.GenerationMode:
    return gw.GENERATION_MODE_AUDIO if "audio" in modalities else gw.GENERATION_MODE_TEXT


def session_message(session_id: str, config: SessionConfig) -> gw.RealtimeSession:
    turns = config.turn_detection
    if turns is None:
        detection = gw.TurnDetection(type=gw.TURN_DETECTION_TYPE_NONE)
    else:
        detection = gw.TurnDetection(type=gw.TURN_DETECTION_TYPE_SERVER_VAD, **dataclasses.asdict(turns))
    return gw.RealtimeSession(
        id=session_id,
        model=config.model,
        voice=config.voice,
        generation_mode=_mode(config.output_modalities),
        instructions=config.instructions,
        turn_detection=detection,
        max_output_tokens=config.max_output_tokens or 0,
        audio_sample_rate=AUDIO_RATE,
    )


def item_message(item: Item) -> gw.RealtimeItem:
    content = []
    for part in item.content:
        if part.kind == "audio":
            content.append(
                gw.ItemContent(audio=gw.ItemAudio(transcript=part.text, duration_ms=part.duration_ms))
            )
        else:
            content.append(gw.ItemContent(text=part.text))
    return gw.RealtimeItem(
        id=item.id,
        role=item.role,
        content=content,
        status=f"ITEM_STATUS_{item.status.upper()}",
    )


def response_message(response: Response) -> gw.RealtimeResponse:
    error = response.error
    message = gw.RealtimeResponse(
        id=response.id,
        status=f"RESPONSE_STATUS_{response.status.upper()}",
        reason=response.reason or (error.code if error is not None else ""),
        message=error.message if error is not None else "",
        generation_mode=_mode(response.output_modalities),
        voice=response.voice,
        max_output_tokens=response.max_output_tokens or 0,
        metadata=response.metadata or {},
        output=[item_message(item) for item in response.output],
    )
    if response.usage is not None:
        message.usage.CopyFrom(gw.TokenUsage(**dataclasses.asdict(response.usage)))
    return message


def refusal_message(error: Error) -> gw.EventRefused:
    field = error.param or ""
    return gw.EventRefused(
        event_id=error.event_id or "",
        message=error.message,
        reason=error.code,
        field=_FIELD_NAMES.get(field, field),
    )


# ---- the call --------------------------------------------------------------------------------------


async def converse(
    core: GatewayCore, call: Call, requests: AsyncIterable[Any], context: ConverseContext
) -> None:
    """Serves one Converse call (see the module docstring); ends it with a status on a failure."""
    try:
        core.auth.authenticate(call)
        info = core.model_info()
    except OmnigateError as exc:
        log.info("converse call %s refused: %s", call.request_id, exc.message)
        await status.abort(context, exc, ((tracing.REQUEST_ID_METADATA, call.request_id),))
        return
    closing: OmnigateError | None = None
    async with RealtimeSession(core, call, info) as session:
        log.info("converse session %s opened (call %s)", session.id, call.request_id)
        reader = asyncio.create_task(_read(requests, session), name=f"{session.id}-read")
        writer = asyncio.create_task(_write(context, session), name=f"{session.id}-write")
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and not reader.cancelled() and reader.exception() is None:
                await asyncio.wait({writer})  # half-closed: the writer ends after the last answer's events
            if writer.done() and not writer.cancelled() and writer.exception() is None:
                closing = writer.result()
        finally:
            for task in (reader, writer):
                task.cancel()
            for outcome in await asyncio.gather(reader, writer, return_exceptions=True):
                if isinstance(outcome, Exception):
                    log.error("converse session %s failed", session.id, exc_info=outcome)
                    closing = closing or InternalError("the conversation failed")
    log.info("converse session %s closed", session.id)
    if closing is not None:
        await status.abort(context, closing, ((tracing.REQUEST_ID_METADATA, call.request_id),))


async def _read(requests: AsyncIterable[Any], session: RealtimeSession) -> None:
    """Client messages into the session until the client half-closes; then the running answer may finish."""
    async for message in requests:
        try:
            event = client_event(message)
        except Refusal as refusal:
            await session.error(refusal.message, refusal.code, refusal.field, refusal.event_id)
            continue
        await session.send(event)
    await session.end_input()


async def _write(context: ConverseContext, session: RealtimeSession) -> OmnigateError | None:
    """The session's events to the client until the session ends; the error to end the stream with when
    the session closed itself (None when its events simply ended)."""
    held: Error | None = None  # an error about the session, not a client event: maybe the reason it closes
    sequence = 0
    async for event in session.events():
        if isinstance(event, SessionClosed):
            if held is not None:
                return _CLOSING_ERRORS.get(held.kind, Unavailable)(held.message)
            return Unavailable(f"the conversation was closed ({event.reason})")
        if held is not None:
            await context.write(server_message(held))
            held = None
        if isinstance(event, Error) and event.kind is not ErrorCode.INVALID_ARGUMENT:
            held = event
            continue
        if isinstance(event, ResponseCreated):
            sequence = 0
        message = server_message(event, sequence)
        if isinstance(event, AudioDelta):
            sequence += 1
        await context.write(message)
    if held is not None:
        await context.write(server_message(held))
    return None
