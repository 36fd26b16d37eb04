"""Typed events of a Generate stream, the collected result, the model description, and the settings and
events of a Converse conversation.

A stream yields ``TextDelta``, ``AudioChunk``, ``Image`` and finally one ``Summary``; ``GenerationResult``
is all of them collected (what ``generate_all`` returns). A conversation yields the ``ConverseEvent`` types
(``SessionCreated`` first, then ``SpeechStarted`` ... ``ResponseDone``, ``EventRefused``).
"""

from __future__ import annotations

import io
import wave
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, overload

import numpy as np


@dataclass(frozen=True)
class TextDelta:
    """A piece of generated text, to append to what came before."""

    text: str


@dataclass(frozen=True)
class AudioChunk:
    """A chunk of generated speech: signed 16-bit little-endian PCM, interleaved channels."""

    pcm_s16le: bytes
    sample_rate: int
    channels: int
    sequence: int  # position in the stream, from 0

    def pcm(self) -> np.ndarray:
        """The samples as int16, shape ``(frames,)`` for mono, ``(frames, channels)`` otherwise."""
        samples = np.frombuffer(self.pcm_s16le, dtype="<i2")
        return samples if self.channels == 1 else samples.reshape(-1, self.channels)

    @property
    def seconds(self) -> float:
        return len(self.pcm_s16le) / (2 * self.channels * self.sample_rate) if self.sample_rate else 0.0


@dataclass(frozen=True)
class Image:
    """A generated image (``data`` holds the encoded file, PNG)."""

    data: bytes
    mime_type: str
    width: int
    height: int


@dataclass(frozen=True)
class Timings:
    """Where the time of one request went, in seconds (as measured by the gateway and the worker)."""

    media_s: float = 0.0  # fetching and decoding media in the gateway
    queue_s: float = 0.0  # waiting in the worker's queue
    time_to_first_output_s: float = 0.0  # start of generation to first output
    generate_s: float = 0.0  # generation in the worker
    total_s: float = 0.0  # end to end, as seen by the gateway

    def __getitem__(self, name: str) -> float:  # ``timings["total_s"]`` works too
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int = 0  # after the chat template and media placeholders were expanded
    output_tokens: int = 0  # generated text tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True)
class Summary:
    """The last event of a successful stream."""

    finish_reason: str  # "stop", "length", "stop_sequence" or "unspecified"
    prompt_tokens: int
    output_tokens: int
    audio_seconds: float
    model_id: str
    timings: Timings

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.output_tokens)

    def to_dict(self) -> dict:
        return asdict(self)


Event = TextDelta | AudioChunk | Image | Summary


class GeneratedAudio(Sequence[AudioChunk]):
    """The speech of a response: the chunks as they streamed (a sequence), and the whole of it joined.

    Empty (and falsy) when the response has no speech.
    """

    def __init__(self, chunks: Sequence[AudioChunk] = ()) -> None:
        self._chunks = sorted(chunks, key=lambda c: c.sequence)

    @overload
    def __getitem__(self, index: int) -> AudioChunk: ...
    @overload
    def __getitem__(self, index: slice) -> list[AudioChunk]: ...
    def __getitem__(self, index):
        return self._chunks[index]

    def __len__(self) -> int:
        return len(self._chunks)

    def __iter__(self) -> Iterator[AudioChunk]:
        return iter(self._chunks)

    def __repr__(self) -> str:
        if not self._chunks:
            return "GeneratedAudio(empty)"
        return f"GeneratedAudio({len(self._chunks)} chunks, {self.seconds:.2f} s at {self.sample_rate} Hz)"

    @property
    def sample_rate(self) -> int:
        return self._chunks[0].sample_rate if self._chunks else 0

    @property
    def channels(self) -> int:
        return self._chunks[0].channels if self._chunks else 1

    @property
    def pcm_bytes(self) -> bytes:
        """All samples as signed 16-bit little-endian PCM."""
        return b"".join(chunk.pcm_s16le for chunk in self._chunks)

    @property
    def pcm(self) -> np.ndarray:
        """All samples as int16, shape ``(frames,)`` for mono, ``(frames, channels)`` otherwise."""
        samples = np.frombuffer(self.pcm_bytes, dtype="<i2")
        return samples if self.channels == 1 else samples.reshape(-1, self.channels)

    @property
    def samples(self) -> np.ndarray:
        """All samples as float32 in [-1, 1)."""
        return self.pcm.astype(np.float32) / 32768.0

    @property
    def seconds(self) -> float:
        rate = self.sample_rate
        return len(self.pcm_bytes) / (2 * self.channels * rate) if rate else 0.0

    def to_wav(self) -> bytes:
        """The speech as a WAV file."""
        if not self._chunks:
            raise ValueError("the response has no audio")
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as out:
            out.setnchannels(self.channels)
            out.setsampwidth(2)
            out.setframerate(self.sample_rate)
            out.writeframes(self.pcm_bytes)
        return buffer.getvalue()


@dataclass
class GenerationResult:
    """Everything a Generate stream returned, collected."""

    text: str = ""
    audio: GeneratedAudio = field(default_factory=GeneratedAudio)
    images: list[Image] = field(default_factory=list)
    summary: Summary | None = None
    request_id: str | None = None  # the gateway's ``x-request-id``, when it sent one

    @classmethod
    def from_events(cls, events: Iterable[Event], request_id: str | None = None) -> GenerationResult:
        text: list[str] = []
        chunks: list[AudioChunk] = []
        images: list[Image] = []
        summary: Summary | None = None
        for event in events:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, AudioChunk):
                chunks.append(event)
            elif isinstance(event, Image):
                images.append(event)
            elif isinstance(event, Summary):
                summary = event
        return cls("".join(text), GeneratedAudio(chunks), images, summary, request_id)

    @property
    def finish_reason(self) -> str | None:
        return self.summary.finish_reason if self.summary else None

    @property
    def usage(self) -> Usage:
        return self.summary.usage if self.summary else Usage()

    @property
    def timings(self) -> Timings:
        return self.summary.timings if self.summary else Timings()

    @property
    def model_id(self) -> str | None:
        return self.summary.model_id if self.summary else None

    def to_wav(self) -> bytes:
        """The speech as a WAV file (ValueError when there is none)."""
        return self.audio.to_wav()

    wav_bytes = to_wav  # the name earlier versions of this client used


Result = GenerationResult  # the name earlier versions of this client used


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway serves (``GetModelInfo``). Also readable as a mapping: ``info["speakers"]``."""

    model_id: str
    architecture: str
    input_modalities: list[str]
    output_modalities: list[str]
    input_audio_sample_rate: int
    output_audio_sample_rate: int
    speakers: list[str]
    limits: dict[str, float | int]

    def __getitem__(self, name: str) -> Any:
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    def to_dict(self) -> dict:
        return asdict(self)


CONVERSE_SAMPLE_RATE = 24000  # Hz, of the audio a conversation takes and sends (16-bit mono PCM)


@dataclass(frozen=True)
class TurnDetection:
    """Server voice-activity detection settings (OpenAI Realtime's ``server_vad``, with its defaults).

    Speech starts at the first 32 ms window whose speech probability reaches ``threshold`` and stops after
    ``silence_duration_ms`` of quieter windows; the committed audio starts ``prefix_padding_ms`` earlier."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True  # answer when the user's turn ends
    interrupt_response: bool = True  # cancel the running answer when the user starts speaking (barge-in)


@dataclass(frozen=True)
class ConversationSession:
    """A conversation's settings (``SessionCreated`` and ``SessionUpdated`` carry them)."""

    id: str
    model: str
    voice: str  # "" for a model without named speakers
    output_mode: str  # "audio" (speech and its transcript) or "text"
    instructions: str  # the system message of every answer ("" = none)
    turn_detection: TurnDetection | None  # None = manual turns
    max_output_tokens: int | None  # None = the gateway's default
    sample_rate: int  # of the audio taken and sent (24000)


@dataclass(frozen=True)
class ItemContent:
    """One part of a conversation item: ``kind`` "text" (``text``) or "audio" (an assistant's spoken answer
    has its transcript in ``text``; the user's audio has its length in ``duration_ms``)."""

    kind: str
    text: str = ""
    duration_ms: int = 0


@dataclass(frozen=True)
class ConversationItem:
    """A message in the conversation."""

    id: str
    role: str  # "user", "assistant" or "system"
    content: list[ItemContent]
    status: str  # "completed", "in_progress" or "incomplete"

    @property
    def text(self) -> str:
        """Its text parts and transcripts, joined."""
        return "".join(part.text for part in self.content)


@dataclass(frozen=True)
class ConversationResponse:
    """One answer of the conversation (``ResponseCreated``, ``ResponseDone``)."""

    id: str
    status: str  # "in_progress", "completed", "cancelled", "incomplete" or "failed"
    reason: str | None  # "turn_detected" / "client_cancelled", "max_output_tokens", or a failure's kind
    message: str | None  # what went wrong, when it failed
    output_mode: str  # "audio" or "text"
    voice: str
    max_output_tokens: int | None
    metadata: dict[str, str]
    output: list[ConversationItem]
    usage: Usage | None  # prompt and output tokens, in ResponseDone

    @property
    def text(self) -> str:
        """The answer's text or transcript."""
        return "".join(item.text for item in self.output)


@dataclass(frozen=True)
class SessionCreated:
    """The first event: the session and its defaults."""

    session: ConversationSession


@dataclass(frozen=True)
class SessionUpdated:
    """The session's settings changed (after ``update_session``)."""

    session: ConversationSession


@dataclass(frozen=True)
class SpeechStarted:
    """The user started speaking (server VAD)."""

    audio_start_ms: int  # in the conversation's input audio, the prefix padding included
    item_id: str  # the id the committed item will have


@dataclass(frozen=True)
class SpeechStopped:
    """The user stopped speaking (server VAD); ``AudioCommitted`` follows."""

    audio_end_ms: int
    item_id: str


@dataclass(frozen=True)
class AudioCommitted:
    """The input audio became a user item; ``ItemCreated`` follows."""

    item_id: str
    previous_item_id: str | None


@dataclass(frozen=True)
class AudioCleared:
    """The input audio buffer was emptied."""


@dataclass(frozen=True)
class ItemCreated:
    """An item was added to the conversation."""

    item: ConversationItem
    previous_item_id: str | None


@dataclass(frozen=True)
class ResponseCreated:
    """An answer started."""

    response: ConversationResponse


@dataclass(frozen=True)
class OutputItemAdded:
    """An answer's assistant message starts."""

    response_id: str
    item: ConversationItem
    previous_item_id: str | None


@dataclass(frozen=True)
class OutputTextDelta:
    """A piece of an answer's text; ``transcript`` is True when it is the transcript of its speech."""

    response_id: str
    item_id: str
    text: str
    transcript: bool


@dataclass(frozen=True)
class OutputAudioDelta:
    """A piece of an answer's speech (16-bit mono PCM at 24 kHz: ``audio.pcm()``, ``audio.seconds``)."""

    response_id: str
    item_id: str
    audio: AudioChunk


@dataclass(frozen=True)
class OutputItemDone:
    """An answer's assistant message is finished, with its whole text or transcript."""

    response_id: str
    item: ConversationItem


@dataclass(frozen=True)
class ResponseDone:
    """An answer ended (``response.status``: completed, cancelled, incomplete or failed)."""

    response: ConversationResponse


@dataclass(frozen=True)
class EventRefused:
    """A message of this client that the gateway did not take; the conversation goes on."""

    message: str  # what was wrong and what is allowed
    reason: str  # "unknown_event", "invalid_value", "input_audio_buffer_commit_empty", ...
    field: str | None  # the field at fault, when there is one
    event_id: str | None  # the refused message's event_id, when it had one


ConverseEvent = (
    SessionCreated
    | SessionUpdated
    | SpeechStarted
    | SpeechStopped
    | AudioCommitted
    | AudioCleared
    | ItemCreated
    | ResponseCreated
    | OutputItemAdded
    | OutputTextDelta
    | OutputAudioDelta
    | OutputItemDone
    | ResponseDone
    | EventRefused
)
