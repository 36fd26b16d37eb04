"""A realtime conversation's events and state as plain data: what a front door feeds a session
(``ClientEvent``), what the session sends back (``ServerEvent``), and the session, item and response
objects those carry.

No wire format here: the OpenAI Realtime WebSocket (``openai_api/realtime_events.py``) and a gRPC stream
each translate their messages to and from these. Audio in events is 16-bit little-endian mono PCM at
``AUDIO_RATE`` (24 kHz) both ways, as OpenAI's ``audio/pcm`` format is.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Literal

from omnigate.errors import ErrorCode

AUDIO_RATE = 24000  # Hz, of the audio a session takes and sends (OpenAI's audio/pcm)

OutputModality = Literal["text", "audio"]
ResponseStatus = Literal["in_progress", "completed", "cancelled", "incomplete", "failed"]
# Why a response was cancelled (OpenAI's status_details.reason) or left incomplete.
CancelReason = Literal["turn_detected", "client_cancelled"]


def new_id(prefix: str) -> str:
    """``item_3f2a...``, ``resp_...``, ``sess_...``: OpenAI's id style (a prefix and 24 hex digits)."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class Unchanged(enum.Enum):
    """An update field left as it is (None can mean "off", as for turn detection)."""

    UNCHANGED = 0


UNCHANGED = Unchanged.UNCHANGED


# ---- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnDetection:
    """Server voice-activity detection, with OpenAI's ``server_vad`` settings and defaults.

    Speech starts at the first 32 ms window whose speech probability reaches ``threshold``; it stops after
    ``silence_duration_ms`` of windows under ``threshold - 0.15`` (Silero's hysteresis). The committed
    audio starts ``prefix_padding_ms`` before the detected start."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True  # answer when speech stops
    interrupt_response: bool = True  # cancel the running answer when speech starts (barge-in)


@dataclass(frozen=True)
class SessionConfig:
    """What a session is set to; ``session.created`` and ``session.updated`` carry it."""

    model: str
    voice: str  # one of the model's speakers ("" for a model without named speakers)
    output_modalities: tuple[OutputModality, ...]  # ("audio",) (speech and its transcript) or ("text",)
    instructions: str = ""  # the system message of every request ("" = none)
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)  # None = manual turns
    max_output_tokens: int | None = None  # per response; None = the gateway's default


@dataclass(frozen=True)
class ResponseOptions:
    """A ``response.create``'s overrides of the session config, for that response only."""

    instructions: str | None = None
    voice: str | None = None
    output_modalities: tuple[OutputModality, ...] | None = None
    max_output_tokens: int | Unchanged | None = UNCHANGED  # None = the gateway's default
    metadata: dict[str, str] | None = None  # echoed on the response


# ---- conversation ----------------------------------------------------------------------------------


@dataclass
class ContentPart:
    """One part of an item: text, or audio (kept as WAV at the model's input rate, ready for a request)."""

    kind: Literal["text", "audio"]
    text: str = ""  # the text; for an assistant's audio part, its transcript
    wav: bytes = b""  # user audio only
    duration_ms: int = 0


@dataclass
class Item:
    """A message in the conversation (OpenAI's ``realtime.item`` of type ``message``)."""

    id: str
    role: Literal["user", "assistant", "system"]
    content: list[ContentPart]
    status: Literal["completed", "incomplete", "in_progress"] = "completed"

    @property
    def audio_parts(self) -> int:
        """The user audio a request carries for this item (an answer's audio part is its transcript)."""
        return sum(1 for part in self.content if part.kind == "audio") if self.role == "user" else 0


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class Response:
    """One answer: a single worker request over the conversation so far."""

    id: str
    output_modalities: tuple[OutputModality, ...]
    voice: str
    max_output_tokens: int | None
    metadata: dict[str, str] | None = None
    status: ResponseStatus = "in_progress"
    reason: str | None = None  # cancelled: CancelReason; incomplete: "max_output_tokens"
    error: Error | None = None  # failed: why
    output: list[Item] = field(default_factory=list)
    usage: Usage | None = None


# ---- events a front door feeds the session ---------------------------------------------------------


@dataclass
class UpdateSession:
    """Changes some of the session's settings (``UNCHANGED`` fields stay as they are)."""

    instructions: str | Unchanged = UNCHANGED
    voice: str | Unchanged = UNCHANGED
    output_modalities: tuple[OutputModality, ...] | Unchanged = UNCHANGED
    turn_detection: TurnDetection | None | Unchanged = UNCHANGED
    max_output_tokens: int | None | Unchanged = UNCHANGED
    event_id: str | None = None  # the client's, echoed in an error about this event


@dataclass
class AppendAudio:
    pcm: bytes  # 16-bit little-endian mono PCM at AUDIO_RATE
    event_id: str | None = None


@dataclass
class CommitAudio:
    event_id: str | None = None


@dataclass
class ClearAudio:
    event_id: str | None = None


@dataclass
class TextContent:
    text: str


@dataclass
class AudioContent:
    pcm: bytes  # 16-bit little-endian mono PCM at AUDIO_RATE


@dataclass
class CreateItem:
    """Adds a message to the end of the conversation: a user's text and/or audio, a system message, or an
    assistant's earlier text."""

    role: Literal["user", "assistant", "system"]
    content: list[TextContent | AudioContent]
    item_id: str | None = None  # the client's id for it; a new one when None
    previous_item_id: str | None = None  # when set, it must be the last item's (items are only appended)
    event_id: str | None = None


@dataclass
class CreateResponse:
    options: ResponseOptions = field(default_factory=ResponseOptions)
    event_id: str | None = None


@dataclass
class CancelResponse:
    response_id: str | None = None  # None = whichever is running
    event_id: str | None = None


ClientEvent = (
    UpdateSession | AppendAudio | CommitAudio | ClearAudio | CreateItem | CreateResponse | CancelResponse
)


# ---- events the session sends ----------------------------------------------------------------------


@dataclass
class SessionCreated:
    session_id: str
    config: SessionConfig


@dataclass
class SessionUpdated:
    session_id: str
    config: SessionConfig


@dataclass
class SpeechStarted:
    audio_start_ms: int  # since the session's first audio, prefix padding included
    item_id: str  # the id the committed item will have


@dataclass
class SpeechStopped:
    audio_end_ms: int
    item_id: str


@dataclass
class AudioCommitted:
    item_id: str
    previous_item_id: str | None


@dataclass
class AudioCleared:
    pass


@dataclass
class ItemCreated:
    item: Item
    previous_item_id: str | None


@dataclass
class ResponseCreated:
    response: Response


@dataclass
class OutputItemAdded:
    """The response's assistant message starts (in progress, no content yet)."""

    response_id: str
    item: Item
    previous_item_id: str | None


@dataclass
class TextDelta:
    """Text of the answer: the text itself in text mode, the speech's transcript in audio mode."""

    response_id: str
    item_id: str
    text: str
    transcript: bool  # True: the transcript of the audio output


@dataclass
class AudioDelta:
    response_id: str
    item_id: str
    pcm: bytes  # 16-bit little-endian mono PCM at AUDIO_RATE


@dataclass
class OutputItemDone:
    """The response's assistant message is finished (completed, or incomplete when cut short)."""

    response_id: str
    item: Item


@dataclass
class ResponseDone:
    response: Response


@dataclass
class Error:
    """A refused client event, or a failure the client should know of; the session stays open unless a
    ``SessionClosed`` follows."""

    message: str
    code: str  # OpenAI-style error code: "unknown_event", "invalid_value", ...
    kind: ErrorCode = ErrorCode.INVALID_ARGUMENT
    param: str | None = None
    event_id: str | None = None  # the client event it answers


@dataclass
class SessionClosed:
    """The session ended on its own (idle too long); the front door closes the connection."""

    reason: str


ServerEvent = (
    SessionCreated
    | SessionUpdated
    | SpeechStarted
    | SpeechStopped
    | AudioCommitted
    | AudioCleared
    | ItemCreated
    | ResponseCreated
    | OutputItemAdded
    | TextDelta
    | AudioDelta
    | OutputItemDone
    | ResponseDone
    | Error
    | SessionClosed
)
