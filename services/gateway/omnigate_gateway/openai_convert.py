"""OpenAI's wire format to and from the gateway's public protobuf messages (pure functions, no I/O).

``http_api`` validates request bodies with the pydantic models here, turns them into a public
``gateway_pb2.GenerateRequest`` (the same message the gRPC API takes) and maps the core's
``GenerateResponse`` events back to OpenAI's JSON (chat completion chunks, messages, images) and errors to
OpenAI's error body with the matching HTTP status.

What is translated:

- chat content parts ``text``, ``image_url`` (http(s) or ``data:`` URL), ``input_audio`` (base64 + format,
  sent inline), ``video_url`` and ``audio_url`` (vLLM's extensions, http(s) or ``data:`` URL);
- ``max_tokens`` / ``max_completion_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``stop``, ``seed``,
  ``n`` (1 only); vLLM's extensions ``top_k``, ``repetition_penalty``, ``min_tokens`` and
  ``mm_processor_kwargs`` (``fps``, ``use_audio_in_video``); without temperature/top_p/top_k the answer is
  greedy (the model's deterministic answer), unlike OpenAI's default temperature of 1;
- ``modalities: ["text", "audio"]`` with ``audio: {voice, format}`` (``wav`` or ``pcm16``) as speech output;
- parameters that would change the answer in ways Omnigate cannot honour (tools, logprobs, JSON mode,
  presence/frequency penalties, ...) are refused with 400 naming the parameter; bookkeeping parameters
  (user, metadata, store, ...) are accepted and ignored; unknown parameters are refused, as OpenAI does.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
import wave
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from omnigate.errors import (
    DeadlineExceeded,
    InvalidInput,
    LimitExceeded,
    OmnigateError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from omnigate.gateway.v1 import gateway_pb2 as gw

# ---- errors ---------------------------------------------------------------------------------------


class InvalidParam(InvalidInput):
    """A 400 that names the offending request parameter (OpenAI's ``error.param``)."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.error_code = code


class NotFound(InvalidInput):
    """404: an unknown model or route (OpenAI answers ``model_not_found`` with 404)."""

    def __init__(self, message: str, code: str = "model_not_found", param: str | None = None) -> None:
        super().__init__(message)
        self.error_code = code
        self.param = param


INTERNAL_MESSAGE = "internal error; the request was logged"

# OmnigateError kind -> (HTTP status, OpenAI error type, error code)
_HTTP_ERRORS: dict[type[OmnigateError], tuple[int, str, str]] = {
    Unauthenticated: (401, "authentication_error", "invalid_api_key"),
    PermissionDenied: (403, "permission_error", "permission_denied"),
    Unavailable: (503, "service_unavailable_error", "service_unavailable"),
    DeadlineExceeded: (504, "timeout_error", "deadline_exceeded"),
}


@dataclass
class HttpError:
    """An error as OpenAI sends it: HTTP status, ``{"error": {...}}`` body and extra headers."""

    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def http_error(exc: BaseException) -> HttpError:
    """Maps an exception to OpenAI's error shape; anything but an OmnigateError is a generic 500."""
    if isinstance(exc, NotFound):
        return HttpError(404, error_body(exc.message, "invalid_request_error", exc.error_code, exc.param))
    if isinstance(exc, InvalidParam):
        return HttpError(400, error_body(exc.message, "invalid_request_error", exc.error_code, exc.param))
    if isinstance(exc, InvalidInput):
        return HttpError(400, error_body(exc.message, "invalid_request_error", "invalid_argument"))
    if isinstance(exc, LimitExceeded):
        if exc.retry_after_s is not None:
            headers = {
                "Retry-After": str(max(1, math.ceil(exc.retry_after_s))),
                "retry-after-ms": str(max(1, round(exc.retry_after_s * 1000))),
            }
            return HttpError(429, error_body(exc.message, "rate_limit_error", "rate_limit_exceeded"), headers)
        return HttpError(413, error_body(exc.message, "invalid_request_error", "request_too_large"))
    for kind, (status, type_, code) in _HTTP_ERRORS.items():
        if isinstance(exc, kind):
            return HttpError(status, error_body(exc.message, type_, code))
    return HttpError(500, error_body(INTERNAL_MESSAGE, "server_error", "internal_error"))


def validation_error(errors: list[dict], *, json_body: bool = True) -> InvalidParam:
    """A pydantic/FastAPI validation error list as one clear 400 naming the parameter."""
    if not json_body:
        return InvalidParam(
            "send the request body as a JSON object with Content-Type: application/json", None, "invalid_json"
        )
    if not errors:
        return InvalidParam("the request body is invalid", None)
    # The most specific error (a union reports one error per member; the deepest one is the useful one).
    error = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = list(error.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    kind = error.get("type", "")
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return InvalidParam(f"the request body is not valid JSON ({detail})", None, "invalid_json")
    param = _param_name(loc)
    if not param:
        if kind == "missing":
            return InvalidParam("the request body is missing; send a JSON object", None, "invalid_json")
        return InvalidParam(f"the request body is invalid: {error.get('msg', '')}", None)
    if kind == "extra_forbidden":
        return InvalidParam(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    return InvalidParam(f"{param}: {error.get('msg', 'invalid value')}", param)


_UNION_MEMBER_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "ImageURL", "AudioFormat"}


def _param_name(loc: list) -> str:
    """("messages", 0, "content", "list[...]", 1, "image_url", "image_url", "url") -> messages[0].content[1].image_url.url"""
    out = ""
    previous = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = str(part)
            # pydantic names union members and discriminator tags in locations: they are not parameters.
            if "[" in name or name in _UNION_MEMBER_NAMES or name.startswith("function-") or name == previous:
                continue
            out += f".{name}" if out else name
            previous = name
    return out


# ---- requests ------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class MediaURL(_Strict):
    url: str


class InputAudio(_Strict):
    data: str
    format: str


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL | str


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURLPart(_Strict):
    type: Literal["audio_url"]
    audio_url: MediaURL | str


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: MediaURL | str


ContentPart = Annotated[
    TextPart | ImagePart | AudioPart | AudioURLPart | VideoPart, Field(discriminator="type")
]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted and ignored (OpenAI's participant name)
    refusal: str | None = None  # an earlier assistant turn's refusal: accepted and ignored
    audio: dict | None = None  # an earlier assistant turn's audio by id: refused (nothing is stored)
    tool_calls: list | None = None  # refused when not empty


class AudioOutput(_Strict):
    voice: str | None = None
    format: str = "wav"


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted and ignored


class MultimodalOptions(_Strict):
    """vLLM's ``mm_processor_kwargs`` for Qwen-Omni-style models."""

    fps: float | None = Field(None, gt=0)
    use_audio_in_video: bool = False


# Accepted and ignored: they change nothing about the answer.
IGNORED_CHAT_PARAMS = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "prompt_cache_options",
    "prompt_cache_retention",
    "safety_identifier",
    "verbosity",
    "reasoning_effort",
)


class ChatCompletionRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOutput | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    prediction: Any = None
    web_search_options: Any = None
    moderation: Any = None
    # vLLM's extensions
    top_k: int | None = None
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0)
    mm_processor_kwargs: MultimodalOptions | None = None
    # accepted and ignored
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: Any = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    verbosity: str | None = None
    reasoning_effort: str | None = None


class ImageGenerationRequest(_Strict):
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int | None = Field(None, ge=1)
    response_format: str | None = None
    size: str | None = None
    output_format: str | None = None
    stream: bool | None = None
    partial_images: int | None = None
    # accepted and ignored
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = None
    user: str | None = None
    safety_identifier: str | None = None


AUDIO_INPUT_MIME = {
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "opus": "audio/ogg",
    "m4a": "audio/mp4",
    "aac": "audio/aac",
    "webm": "audio/webm",
}
AUDIO_OUTPUT_FORMATS = ("wav", "pcm16")
IMAGE_OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass
class ChatOptions:
    """What the HTTP layer needs to know about a chat request besides the GenerateRequest."""

    stream: bool
    include_usage: bool
    audio_format: str | None  # "wav" / "pcm16" when speech was asked for, else None
    voice: str | None


def chat_request(body: ChatCompletionRequest) -> tuple[gw.GenerateRequest, ChatOptions]:
    """An OpenAI chat completion request as the public GenerateRequest; raises InvalidParam."""
    _refuse_unsupported_chat_params(body)
    messages = [_message(i, m) for i, m in enumerate(body.messages)]

    modalities = set(body.modalities or ["text"])
    audio_format = None
    if "audio" in modalities:
        if body.audio is None:
            raise InvalidParam(
                'modalities includes "audio": set audio, e.g. {"voice": "Chelsie", "format": "wav"}', "audio"
            )
        if body.audio.format not in AUDIO_OUTPUT_FORMATS:
            raise InvalidParam(
                f"audio.format {body.audio.format!r} is not supported; use one of {', '.join(AUDIO_OUTPUT_FORMATS)}",
                "audio.format",
            )
        audio_format = body.audio.format
        mode = gw.GENERATION_MODE_AUDIO
    else:
        if body.audio is not None:
            raise InvalidParam('audio is set but modalities does not include "audio"', "modalities")
        mode = gw.GENERATION_MODE_TEXT

    request = gw.GenerateRequest(
        messages=messages,
        parameters=_parameters(body),
        generation_mode=mode,
        speaker=(body.audio.voice or "") if body.audio else "",
    )
    mm = body.mm_processor_kwargs
    if mm is not None:
        request.video.fps = mm.fps or 0.0
        request.video.load_audio_from_video = mm.use_audio_in_video
    options = ChatOptions(
        stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        audio_format=audio_format,
        voice=body.audio.voice if body.audio else None,
    )
    if body.stream_options is not None and not body.stream:
        raise InvalidParam("stream_options is only allowed when stream is true", "stream_options")
    return request, options


def _refuse_unsupported_chat_params(body: ChatCompletionRequest) -> None:
    def refuse(param: str, why: str) -> None:
        raise InvalidParam(f"{param} is not supported by Omnigate{why}", param, "unsupported_parameter")

    if body.n not in (None, 1):
        refuse("n", "; only n=1 (one choice per request)")
    if body.logprobs or body.top_logprobs:
        refuse("logprobs" if body.logprobs else "top_logprobs", "")
    if body.logit_bias:
        refuse("logit_bias", "")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            refuse(name, "; use repetition_penalty (> 1 discourages repetition)")
    if body.response_format and body.response_format.get("type", "text") != "text":
        refuse("response_format", '; only {"type": "text"}')
    if body.tools or body.functions:
        refuse("tools" if body.tools else "functions", "")
    if body.tool_choice not in (None, "none", "auto") or body.function_call not in (None, "none", "auto"):
        refuse("tool_choice" if body.tool_choice not in (None, "none", "auto") else "function_call", "")
    for name in ("prediction", "web_search_options", "moderation"):
        if getattr(body, name) is not None:
            refuse(name, "")


def _message(i: int, m: ChatMessage) -> gw.Message:
    param = f"messages[{i}]"
    if m.audio is not None:
        raise InvalidParam(
            f"{param}.audio: Omnigate stores no earlier audio answers; send the transcript as content instead",
            f"{param}.audio",
            "unsupported_parameter",
        )
    if m.tool_calls:
        raise InvalidParam(f"{param}.tool_calls: tools are not supported", f"{param}.tool_calls")
    role = "system" if m.role == "developer" else m.role
    content: list[gw.ContentPart] = []
    if isinstance(m.content, str):
        content.append(gw.ContentPart(text=m.content))
    elif m.content is not None:
        for j, part in enumerate(m.content):
            content.append(_part(part, f"{param}.content[{j}]"))
    if not content:
        raise InvalidParam(f"{param}.content is empty", f"{param}.content")
    return gw.Message(role=role, content=content)


def _part(part, param: str) -> gw.ContentPart:
    if isinstance(part, TextPart):
        return gw.ContentPart(text=part.text)
    if isinstance(part, ImagePart):
        url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
        return gw.ContentPart(image=gw.MediaSource(url=_url(url, f"{param}.image_url.url")))
    if isinstance(part, AudioURLPart):
        url = part.audio_url if isinstance(part.audio_url, str) else part.audio_url.url
        return gw.ContentPart(audio=gw.MediaSource(url=_url(url, f"{param}.audio_url.url")))
    if isinstance(part, VideoPart):
        url = part.video_url if isinstance(part.video_url, str) else part.video_url.url
        return gw.ContentPart(video=gw.MediaSource(url=_url(url, f"{param}.video_url.url")))
    if isinstance(part, AudioPart):
        fmt = part.input_audio.format.lower()
        if fmt not in AUDIO_INPUT_MIME:
            raise InvalidParam(
                f"{param}.input_audio.format {part.input_audio.format!r} is not supported; use one of "
                f"{', '.join(AUDIO_INPUT_MIME)}",
                f"{param}.input_audio.format",
            )
        data = decode_base64(part.input_audio.data, f"{param}.input_audio.data")
        return gw.ContentPart(
            audio=gw.MediaSource(inline=gw.InlineMedia(data=data, mime_type=AUDIO_INPUT_MIME[fmt]))
        )
    raise InvalidParam(
        f"{param}: unknown content part", param
    )  # pragma: no cover - pydantic checked the type


def _url(url: str, param: str) -> str:
    if not url.strip():
        raise InvalidParam(f"{param} is empty", param)
    return url.strip()


def decode_base64(data: str, param: str) -> bytes:
    if data.startswith("data:"):  # some clients send a data URL where OpenAI wants bare base64
        _, _, data = data.partition(",")
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParam(f"{param} is not valid base64", param) from None
    if not decoded:
        raise InvalidParam(f"{param} is empty", param)
    return decoded


def _parameters(body: ChatCompletionRequest) -> gw.GenerationParameters:
    p = gw.GenerationParameters()
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens:
        p.max_new_tokens = max_tokens
    top_k = body.top_k if body.top_k and body.top_k > 0 else None
    if body.temperature is not None:
        sample = body.temperature > 0
    else:
        sample = (body.top_p is not None and body.top_p < 1) or top_k is not None
    p.do_sample = sample
    if sample:
        if body.temperature is not None:
            p.temperature = body.temperature
        if body.top_p is not None:
            p.top_p = body.top_p
        if top_k is not None:
            p.top_k = top_k
    if body.repetition_penalty is not None:
        p.repetition_penalty = body.repetition_penalty
    if body.seed is not None:
        p.seed = body.seed % 2**64
    if body.stop:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        p.stop.extend(s for s in stops if s)
    if body.min_tokens:
        p.min_new_tokens = body.min_tokens
    return p


def image_request(body: ImageGenerationRequest) -> tuple[gw.GenerateRequest, str, tuple[int, int] | None]:
    """An OpenAI image generation request as a GenerateRequest; also the output format and size."""
    if body.n not in (None, 1):
        raise InvalidParam("n is not supported by Omnigate; only n=1", "n", "unsupported_parameter")
    if body.response_format not in (None, "b64_json"):
        raise InvalidParam(
            'response_format must be "b64_json" (Omnigate stores no images to link to)', "response_format"
        )
    if body.stream or body.partial_images:
        param = "stream" if body.stream else "partial_images"
        raise InvalidParam(f"{param} is not supported for images", param, "unsupported_parameter")
    output_format = body.output_format or "png"
    if output_format not in IMAGE_OUTPUT_FORMATS:
        raise InvalidParam(
            f"output_format {output_format!r} is not supported; use one of {', '.join(IMAGE_OUTPUT_FORMATS)}",
            "output_format",
        )
    size = None
    if body.size not in (None, "auto"):
        width, sep, height = body.size.partition("x")
        if not (
            sep
            and width.isdigit()
            and height.isdigit()
            and 0 < int(width) <= 4096
            and 0 < int(height) <= 4096
        ):
            raise InvalidParam(
                f"size {body.size!r} must be 'auto' or WIDTHxHEIGHT (at most 4096x4096)", "size"
            )
        size = (int(width), int(height))
    request = gw.GenerateRequest(
        messages=[gw.Message(role="user", content=[gw.ContentPart(text=body.prompt)])],
        generation_mode=gw.GENERATION_MODE_IMAGE,
    )
    return request, output_format, size


def model_matches(requested: str | None, served: str) -> bool:
    """A request's ``model`` names the served model: its id, or the id's last path component."""
    if not requested:
        return True
    return requested == served or requested == served.rstrip("/").rsplit("/", 1)[-1]


def pick_voice(voice: str | None, speakers: list[str]) -> str:
    """The model's speaker for an OpenAI voice name (case-insensitive); unknown names pass through."""
    if not voice:
        return ""
    for speaker in speakers:
        if speaker.lower() == voice.lower():
            return speaker
    return voice


# ---- responses -----------------------------------------------------------------------------------

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


def wav_header(sample_rate: int, channels: int, data_bytes: int | None) -> bytes:
    """A 44-byte PCM 16-bit WAV header; ``data_bytes=None`` writes the 0xFFFFFFFF sizes of a WAV stream of
    unknown length (what ffmpeg writes to a pipe; libsndfile, ffmpeg, browsers and Python's wave read it)."""
    size = 0xFFFFFFFF if data_bytes is None else data_bytes
    riff = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    block = channels * 2
    return (
        b"RIFF"
        + struct.pack("<I", riff)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, 16)
        + b"data"
        + struct.pack("<I", size)
    )


def wav_bytes(pcm: bytes, sample_rate: int, channels: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return buffer.getvalue()


class ChatStream:
    """Turns the core's events into OpenAI ``chat.completion.chunk`` objects (one request, one choice).

    Text mode streams ``delta.content``. Speech mode streams as OpenAI does: the text as
    ``delta.audio.transcript``, the speech as ``delta.audio.data`` (base64 16-bit PCM; for ``format: "wav"``
    the first data chunk starts with a WAV header of unknown length, so the concatenated data is a WAV
    file), and a last audio update with ``expires_at``.
    """

    def __init__(self, completion_id: str, created: int, model: str, options: ChatOptions) -> None:
        self.id = completion_id
        self.created = created
        self.model = model
        self.options = options
        self.audio_id = f"audio_{completion_id.removeprefix('chatcmpl-')}"
        self._header_sent = False
        self._sample_rate = 24000
        self._channels = 1

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.options.include_usage:
            chunk["usage"] = None
        return chunk

    def start(self) -> dict:
        if self.options.audio_format:
            return self._chunk({"role": "assistant", "content": None, "refusal": None})
        return self._chunk({"role": "assistant", "content": "", "refusal": None})

    def event(self, event: gw.GenerateResponse) -> list[dict]:
        kind = event.WhichOneof("event")
        if kind == "text":
            if not event.text.text:
                return []
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
        chunks.append(self._chunk({}, FINISH_REASONS.get(summary.finish_reason, "stop")))
        if self.options.include_usage:
            chunks.append(
                {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": usage(summary),
                }
            )
        return chunks


def chat_completion(
    completion_id: str, created: int, model: str, options: ChatOptions, events: list[gw.GenerateResponse]
) -> dict:
    """All events of one request as a non-streamed ``chat.completion``."""
    text = "".join(e.text.text for e in events if e.WhichOneof("event") == "text")
    chunks = [e.audio for e in events if e.WhichOneof("event") == "audio"]
    summaries = [e.summary for e in events if e.WhichOneof("event") == "summary"]
    summary = summaries[-1] if summaries else gw.Summary()
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


def image_result(
    image: gw.GeneratedImage, output_format: str, size: tuple[int, int] | None
) -> tuple[bytes, int, int]:
    """The generated image in the requested format and size (Pillow; PNG as generated needs no work)."""
    if output_format == "png" and size is None and image.mime_type == "image/png":
        return image.data, image.width, image.height
    from PIL import Image

    with Image.open(io.BytesIO(image.data)) as picture:
        picture = picture.convert("RGB")
        if size is not None and picture.size != size:
            picture = picture.resize(size, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        picture.save(out, format=IMAGE_OUTPUT_FORMATS[output_format])
        return out.getvalue(), picture.width, picture.height


def model_object(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "omnigate"}
