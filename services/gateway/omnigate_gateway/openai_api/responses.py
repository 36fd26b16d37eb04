"""The core's ``GenerateResponse`` events as OpenAI's answers: ``chat.completion`` and ``text_completion``
objects, the chunks of their streams (``chat.completion.chunk``, streamed ``text_completion``), model
objects, transcriptions and their stream's events; pure functions, no I/O (``streaming`` sends the chunks
as server-sent events)."""

from __future__ import annotations

import base64
from typing import Any

from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate_gateway.openai_api.encoding import wav_bytes, wav_header
from omnigate_gateway.openai_api.requests import ChatOptions, CompletionOptions

FINISH_REASONS = {
    gw.FINISH_REASON_STOP: "stop",
    gw.FINISH_REASON_LENGTH: "length",
    gw.FINISH_REASON_STOP_SEQUENCE: "stop",
}


def usage(summary: gw.Summary) -> dict:
    return {
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.output_tokens,
        "total_tokens": summary.prompt_tokens + summary.output_tokens,
    }


class _Stream:
    """What chat and text completion streams share: the chunk envelope and the usage chunks carry.

    With ``include_usage`` a last chunk (no choices) carries the usage; with ``continuous_usage`` every
    chunk carries a running one too: ``completion_tokens`` counts the text deltas so far (a lower bound:
    the worker merges deltas when it is busy) and the prompt's count is null until the summary, which makes
    the usage exact from the chunk with the finish reason on."""

    object = ""

    def __init__(
        self, completion_id: str, created: int, model: str, include_usage: bool, continuous_usage: bool
    ) -> None:
        self.id = completion_id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage
        self._text_deltas = 0
        self._summary: gw.Summary | None = None

    def _envelope(self, choices: list[dict]) -> dict:
        chunk = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = self._running_usage() if self.continuous_usage else None
        return chunk

    def _running_usage(self) -> dict:
        if self._summary is not None:
            return usage(self._summary)
        return {"prompt_tokens": None, "completion_tokens": self._text_deltas, "total_tokens": None}

    def _finish(self, summary: gw.Summary, last_choice: dict) -> list[dict]:
        self._summary = summary
        chunks = [self._envelope([last_choice])]
        if self.include_usage:
            chunks.append({**self._envelope([]), "usage": usage(summary)})
        return chunks


class ChatStream(_Stream):
    """Turns the core's events into OpenAI ``chat.completion.chunk`` objects (one request, one choice).

    Text mode streams ``delta.content``. Speech mode streams as OpenAI does: the text as
    ``delta.audio.transcript``, the speech as ``delta.audio.data`` (base64 16-bit PCM; for ``format: "wav"``
    the first data chunk starts with a WAV header of unknown length, so the concatenated data is a WAV
    file), and a last audio update with ``expires_at``.
    """

    object = "chat.completion.chunk"

    def __init__(self, completion_id: str, created: int, model: str, options: ChatOptions) -> None:
        super().__init__(completion_id, created, model, options.include_usage, options.continuous_usage)
        self.options = options
        self.audio_id = f"audio_{completion_id.removeprefix('chatcmpl-')}"
        self._header_sent = False
        self._sample_rate = 24000
        self._channels = 1

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return self._envelope(
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )

    def start(self) -> dict:
        if self.options.audio_format:
            return self._chunk({"role": "assistant", "content": None, "refusal": None})
        return self._chunk({"role": "assistant", "content": "", "refusal": None})

    def event(self, event: gw.GenerateResponse) -> list[dict]:
        kind = event.WhichOneof("event")
        if kind == "text":
            if not event.text.text:
                return []
            self._text_deltas += 1
            if self.options.audio_format:
                return [self._chunk({"audio": {"id": self.audio_id, "transcript": event.text.text}})]
            return [self._chunk({"content": event.text.text})]
        if kind == "audio" and self.options.audio_format:
            self._sample_rate = event.audio.sample_rate or self._sample_rate
            self._channels = event.audio.channels or 1
            data = event.audio.pcm
            if self.options.audio_format == "wav" and not self._header_sent:
                data = wav_header(self._sample_rate, self._channels, None) + data
                self._header_sent = True
            return [self._chunk({"audio": {"id": self.audio_id, "data": base64.b64encode(data).decode()}})]
        if kind == "summary":
            return self.finish(event.summary)
        return []

    def finish(self, summary: gw.Summary) -> list[dict]:
        chunks = []
        if self.options.audio_format:
            audio: dict = {"id": self.audio_id, "expires_at": self.created + 3600}
            if self.options.audio_format == "wav" and not self._header_sent:
                audio["data"] = base64.b64encode(wav_header(self._sample_rate, self._channels, 0)).decode()
            chunks.append(self._chunk({"audio": audio}))
        last = {
            "index": 0,
            "delta": {},
            "logprobs": None,
            "finish_reason": FINISH_REASONS.get(summary.finish_reason, "stop"),
        }
        return chunks + self._finish(summary, last)


class CompletionStream(_Stream):
    """Turns the core's events into OpenAI ``text_completion`` chunks (one request, one choice); with
    ``echo`` the first chunk is the prompt."""

    object = "text_completion"

    def __init__(self, completion_id: str, created: int, model: str, options: CompletionOptions) -> None:
        super().__init__(completion_id, created, model, options.include_usage, options.continuous_usage)
        self.options = options

    def _chunk(self, text: str, finish_reason: str | None = None) -> dict:
        return self._envelope([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}])

    def start(self) -> list[dict]:
        return [self._chunk(self.options.echo)] if self.options.echo else []

    def event(self, event: gw.GenerateResponse) -> list[dict]:
        kind = event.WhichOneof("event")
        if kind == "text" and event.text.text:
            self._text_deltas += 1
            return [self._chunk(event.text.text)]
        if kind == "summary":
            last = {
                "index": 0,
                "text": "",
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(event.summary.finish_reason, "stop"),
            }
            return self._finish(event.summary, last)
        return []


def _last_summary(events: list[gw.GenerateResponse]) -> gw.Summary:
    summaries = [e.summary for e in events if e.WhichOneof("event") == "summary"]
    return summaries[-1] if summaries else gw.Summary()


def chat_completion(
    completion_id: str, created: int, model: str, options: ChatOptions, events: list[gw.GenerateResponse]
) -> dict:
    """All events of one request as a non-streamed ``chat.completion``."""
    text = "".join(e.text.text for e in events if e.WhichOneof("event") == "text")
    chunks = [e.audio for e in events if e.WhichOneof("event") == "audio"]
    summary = _last_summary(events)
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if options.audio_format:
        pcm = b"".join(c.pcm for c in chunks)
        rate = chunks[0].sample_rate if chunks else 24000
        channels = (chunks[0].channels or 1) if chunks else 1
        data = wav_bytes(pcm, rate, channels) if options.audio_format == "wav" else pcm
        message["content"] = None
        message["audio"] = {
            "id": f"audio_{completion_id.removeprefix('chatcmpl-')}",
            "data": base64.b64encode(data).decode(),
            "expires_at": created + 3600,
            "transcript": text,
        }
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(summary.finish_reason, "stop"),
            }
        ],
        "usage": usage(summary),
    }


def text_completion(
    completion_id: str,
    created: int,
    model: str,
    options: CompletionOptions,
    events: list[gw.GenerateResponse],
) -> dict:
    """All events of one request as a non-streamed ``text_completion``."""
    text = "".join(e.text.text for e in events if e.WhichOneof("event") == "text")
    summary = _last_summary(events)
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "text": (options.echo or "") + text,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(summary.finish_reason, "stop"),
            }
        ],
        "usage": usage(summary),
    }


def model_object(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "omnigate"}


def transcription_usage(summary: gw.Summary) -> dict:
    """A transcription's usage as OpenAI counts it (tokens in, tokens out)."""
    return {
        "type": "tokens",
        "input_tokens": summary.prompt_tokens,
        "output_tokens": summary.output_tokens,
        "total_tokens": summary.prompt_tokens + summary.output_tokens,
    }


def transcription(events: list[gw.GenerateResponse]) -> dict:
    """All events of one transcription as OpenAI's ``json`` answer (``text`` answers ``["text"]`` alone)."""
    text = "".join(e.text.text for e in events if e.WhichOneof("event") == "text")
    return {"text": text, "usage": transcription_usage(_last_summary(events))}


class TranscriptionStream:
    """Turns the core's events into OpenAI's streamed transcription events: ``transcript.text.delta`` per
    text delta, then ``transcript.text.done`` with the whole text and the usage."""

    def __init__(self) -> None:
        self._text: list[str] = []

    def start(self) -> list[dict]:
        return []

    def event(self, event: gw.GenerateResponse) -> list[dict]:
        kind = event.WhichOneof("event")
        if kind == "text" and event.text.text:
            self._text.append(event.text.text)
            return [{"type": "transcript.text.delta", "delta": event.text.text, "logprobs": None}]
        if kind == "summary":
            return [
                {
                    "type": "transcript.text.done",
                    "text": "".join(self._text),
                    "logprobs": None,
                    "usage": transcription_usage(event.summary),
                }
            ]
        return []
