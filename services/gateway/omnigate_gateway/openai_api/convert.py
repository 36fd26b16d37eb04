"""OpenAI's wire format to and from the gateway's public protobuf messages (pure functions, no I/O).

``http_api`` validates request bodies with the pydantic models here, turns them into a public
``gateway_pb2.GenerateRequest`` (the same message the gRPC API takes) and maps the core's
``GenerateResponse`` events back to OpenAI's JSON (chat completion chunks, messages, text completions,
images) and errors to OpenAI's error body with the matching HTTP status.

What is translated:

- chat content parts ``text``, ``image_url`` (http(s) or ``data:`` URL), ``input_audio`` (base64 + format,
  sent inline), ``video_url`` and ``audio_url`` (vLLM's extensions, http(s) or ``data:`` URL);
- ``/v1/completions``: a text ``prompt`` (a string, or a list of exactly one string) becomes one user
  message, so the model's chat template applies, as for chat (Omnigate has no raw-prompt mode; token-id
  prompts, several prompts and ``suffix`` are refused). ``echo`` is honoured: the answer starts with the
  prompt text. Without ``max_tokens`` the gateway's default length applies (not OpenAI's 16);
- ``max_tokens`` / ``max_completion_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``stop``, ``seed``,
  ``n`` (1 only); without temperature/top_p/top_k the answer is greedy (the model's deterministic answer),
  unlike OpenAI's default temperature of 1;
- ``modalities: ["text", "audio"]`` with ``audio: {voice, format}`` (``wav`` or ``pcm16``) as speech output;
- ``stream_options``: ``include_usage`` adds a last chunk with the usage; vLLM's ``continuous_usage_stats``
  puts a running ``usage`` on every chunk (it implies ``include_usage``). Mid-stream, ``completion_tokens``
  counts the text deltas sent so far (a delta carries one token, or several merged when the worker is busy,
  so it is a lower bound) and ``prompt_tokens``/``total_tokens`` are null: the worker reports exact counts
  only when it finishes, and from the chunk with the ``finish_reason`` on the usage is exact.

vLLM's extensions (what benchmark clients such as AIPerf, vLLM's ``benchmark_serving`` and GuideLLM send):

- honoured: ``ignore_eos`` (exactly ``max_tokens`` tokens: ``parameters.ignore_eos``), ``min_tokens``,
  ``top_k`` (-1 or 0 = no cut-off), ``repetition_penalty``, ``seed``, ``mm_processor_kwargs`` (``fps``,
  ``use_audio_in_video``);
- accepted at the value that matches what Omnigate does, refused with 400 otherwise: ``skip_special_tokens``
  (true: special tokens never reach the text), ``include_stop_str_in_output`` (false: a stop string is
  never part of the answer), ``n``/``best_of`` (1), ``use_beam_search`` (false), ``length_penalty`` (1),
  ``min_p`` (0), ``add_generation_prompt`` (true), ``continue_final_message`` and chat ``echo`` (false),
  ``return_tokens_as_token_ids`` (false);
- accepted and ignored: ``spaces_between_special_tokens`` (only matters when special tokens are kept, and
  they never are), ``priority`` (one queue), ``cache_salt`` (no prefix cache);
- refused when set: ``stop_token_ids``, ``bad_words``, ``allowed_token_ids``, ``logits_processors``,
  ``truncate_prompt_tokens``, ``prompt_logprobs``, guided decoding (``guided_*``, ``structured_outputs``),
  ``chat_template``, ``chat_template_kwargs``, ``documents``.

Other OpenAI parameters that would change the answer in ways Omnigate cannot honour (tools, logprobs, JSON
mode, presence/frequency penalties, ...) are refused with 400 naming the parameter; bookkeeping parameters
(user, metadata, store, ...) are accepted and ignored; unknown parameters are refused, as OpenAI does.

Domains (checked here, before anything becomes a protobuf field, so that no value can turn into a 500 or
silently into another one: the wire fields are uint32/uint64/float32): integers within their field
(``max_tokens`` 1 to the model's limit, ``min_tokens`` 0 to ``max_tokens``, ``top_k`` -1 to 2^31-1,
``seed`` -2^63 to 2^64-1, negative seeds taken modulo 2^64), ``temperature`` 0 or 1e-5 to 2 (OpenAI's
range; gRPC allows more), ``top_p`` above 0 (a float32 that is not 0 or denormal) and at most 1,
``repetition_penalty`` 0.01 to 100, all finite (Python's JSON parser takes NaN and Infinity). The ranges are
``omnigate.validation``'s, which the core applies again to every door; messages have its form, "<param> is
<value>; it must be ...". Any string in the body holding a lone UTF-16 surrogate (legal JSON, ``"\\ud800"``,
but not Unicode) is refused naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import struct
import wave
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, overload

from pydantic import BaseModel, ConfigDict, Field, model_validator

from omnigate import validation
from omnigate.errors import (
    QUOTE_LIMIT,
    DeadlineExceeded,
    InvalidInput,
    LimitExceeded,
    OmnigateError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    quote,
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
    param = _cut(_param_name(loc))  # a parameter name is user input too: an unknown key can be any size
    message = _cut(str(error.get("msg", "invalid value")), 200)  # pydantic's may repeat a tag that was sent
    if not param:
        if kind == "missing":
            return InvalidParam("the request body is missing; send a JSON object", None, "invalid_json")
        return InvalidParam(f"the request body is invalid: {message}", None)
    if kind == "extra_forbidden":
        return InvalidParam(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    return InvalidParam(f"{param}: {message}", param)


def _cut(text: str, limit: int = QUOTE_LIMIT) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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


def refuse_invalid_unicode(body: object) -> None:
    """Refuses a parsed JSON body with a string (or key) holding a lone UTF-16 surrogate, naming the field.

    JSON's ``"\\ud800"`` escape is legal JSON, and Python's parser turns it into a str that no encoder can
    send on: it would fail as a 500 when the request becomes a protobuf (or a log line). Iterative, so that
    a deeply nested body costs no recursion."""
    pending: list[tuple[object, str]] = [(body, "")]
    while pending:
        value, path = pending.pop()
        if isinstance(value, str):
            if not value.isascii():
                _check_unicode(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and not key.isascii():
                    _check_unicode(key, path, key=True)
                pending.append((item, f"{path}.{key}" if path else str(key)))
        elif isinstance(value, list):
            pending.extend((item, f"{path}[{i}]") for i, item in enumerate(value))


def _check_unicode(text: str, path: str, *, key: bool = False) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = f"a key of {path}" if key and path else "a key of the request body" if key else path
        raise InvalidParam(
            f"{_cut(where or 'the request body')} contains an unpaired UTF-16 surrogate "
            f"(U+{ord(text[exc.start]):04X} at character {exc.start}); send valid Unicode",
            _cut(path) or None,
        ) from None


# ---- requests ------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Body(_Strict):
    """A whole request body: its strings are checked for valid Unicode before anything else."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        refuse_invalid_unicode(data)  # raises InvalidParam, which pydantic lets through unchanged
        return data


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
    continuous_usage_stats: bool = False  # vLLM's: a running usage on every chunk
    include_obfuscation: bool | None = None  # accepted and ignored


class MultimodalOptions(_Strict):
    """vLLM's ``mm_processor_kwargs`` for Qwen-Omni-style models."""

    fps: float | None = None
    use_audio_in_video: bool = False


class _GenerationBody(_Body):
    """The parameters chat and completions share: OpenAI's sampling parameters and vLLM's extensions.

    Numbers are typed loosely (no pydantic bounds) and checked by ``_parameters``, whose messages name the
    parameter and its range; parameters Omnigate honours only at one value are ``Any`` and checked against
    ``_ONE_VALUE``."""

    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: Any = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict | None = None
    # vLLM's extensions: honoured
    top_k: int | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    # vLLM's extensions: honoured at one value only (_ONE_VALUE)
    skip_special_tokens: Any = None
    include_stop_str_in_output: Any = None
    use_beam_search: Any = None
    best_of: Any = None
    length_penalty: Any = None
    min_p: Any = None
    return_tokens_as_token_ids: Any = None
    # vLLM's extensions: refused when set (_UNSUPPORTED)
    stop_token_ids: Any = None
    bad_words: Any = None
    allowed_token_ids: Any = None
    logits_processors: Any = None
    truncate_prompt_tokens: Any = None
    prompt_logprobs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    structured_outputs: Any = None
    # accepted and ignored: they change nothing about the answer
    spaces_between_special_tokens: bool | None = None
    priority: int | None = None
    cache_salt: str | None = None
    user: str | None = None


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
    "spaces_between_special_tokens",
    "priority",
    "cache_salt",
)


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOutput | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    prediction: Any = None
    web_search_options: Any = None
    moderation: Any = None
    # vLLM's extensions
    mm_processor_kwargs: MultimodalOptions | None = None
    echo: Any = None
    add_generation_prompt: Any = None
    continue_final_message: Any = None
    chat_template: Any = None
    chat_template_kwargs: Any = None
    documents: Any = None
    # accepted and ignored
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


def bounded_chat_request(limits: validation.RequestLimits) -> type[ChatCompletionRequest]:
    """``ChatCompletionRequest`` that refuses more messages or content parts than ``limits`` before it
    validates any of them: a 3 MB body of 100,000 tiny messages would otherwise hold the event loop for
    a second in validation and conversion before the core's own count check refused it."""

    class BoundedChatCompletionRequest(ChatCompletionRequest):
        @model_validator(mode="before")
        @classmethod
        def _shape(cls, data: Any) -> Any:
            messages = data.get("messages") if isinstance(data, dict) else None
            if isinstance(messages, list):
                parts = sum(
                    len(m["content"]) if isinstance(m, dict) and isinstance(m.get("content"), list) else 1
                    for m in messages
                )
                validation.check_counts(len(messages), parts, limits)  # LimitExceeded: not a ValueError
            return data

    return BoundedChatCompletionRequest


class CompletionRequest(_GenerationBody):
    """``POST /v1/completions`` (OpenAI's legacy text completions, what benchmark clients also use)."""

    prompt: Any = None  # checked by completion_request: a string or a list of one string
    echo: bool | None = None
    suffix: Any = None
    logprobs: Any = None


class ImageGenerationRequest(_Body):
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

# Parameters honoured at one value only: name -> (the values accepted, what Omnigate does instead).
_ONE_VALUE: dict[str, tuple[tuple, str]] = {
    "n": ((1,), "Omnigate answers with one choice per request"),
    "best_of": ((1,), "Omnigate generates one candidate per request"),
    "skip_special_tokens": ((True,), "special tokens never reach the text"),
    "include_stop_str_in_output": ((False,), "a stop string is never part of the answer"),
    "use_beam_search": ((False,), "Omnigate samples or decodes greedily; there is no beam search"),
    "length_penalty": ((1,), "it only applies to beam search"),
    "min_p": ((0,), "min-p sampling is not supported"),
    "return_tokens_as_token_ids": ((False,), "the answer is text"),
    "add_generation_prompt": ((True,), "the chat template always ends with the assistant's turn"),
    "continue_final_message": ((False,), "the answer is always a new assistant turn"),
}
# Refused when set to anything but null or empty.
_UNSUPPORTED = (
    "logit_bias",
    "stop_token_ids",
    "bad_words",
    "allowed_token_ids",
    "logits_processors",
    "truncate_prompt_tokens",
    "prompt_logprobs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "structured_outputs",
    "tools",
    "functions",
    "prediction",
    "web_search_options",
    "moderation",
    "chat_template",
    "chat_template_kwargs",
    "documents",
    "suffix",
)

UINT32_MAX = 2**32 - 1
MIN_SEED = -(2**63)
MAX_HTTP_TEMPERATURE = 2.0  # OpenAI's range (gRPC callers may go up to validation.MAX_TEMPERATURE)
# The protocol's float fields are float32: a smaller positive value would arrive as 0 or a denormal.
FLOAT32_MIN_NORMAL = 1.1754943508222875e-38
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class ChatOptions:
    """What the HTTP layer needs to know about a chat request besides the GenerateRequest."""

    stream: bool
    include_usage: bool
    audio_format: str | None  # "wav" / "pcm16" when speech was asked for, else None
    voice: str | None
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage on every chunk


@dataclass
class CompletionOptions:
    """What the HTTP layer needs to know about a text completion request besides the GenerateRequest."""

    stream: bool
    include_usage: bool
    continuous_usage: bool = False
    echo: str | None = None  # the prompt, when the answer starts with it


def chat_request(
    body: ChatCompletionRequest, max_new_tokens_limit: int | None = None
) -> tuple[gw.GenerateRequest, ChatOptions]:
    """An OpenAI chat completion request as the public GenerateRequest; raises InvalidParam.

    ``max_new_tokens_limit``: the served model's limit (``max_tokens`` above it is refused naming it)."""
    _refuse_unsupported(body)
    if body.logprobs or body.top_logprobs:
        _refuse("logprobs" if body.logprobs else "top_logprobs", "")
    if body.tool_choice not in (None, "none", "auto") or body.function_call not in (None, "none", "auto"):
        _refuse("tool_choice" if body.tool_choice not in (None, "none", "auto") else "function_call", "")
    if body.echo not in (None, False):
        raise InvalidParam(
            f"echo is {_shown(body.echo)}; it must be false for chat (use /v1/completions to echo a prompt)",
            "echo",
            "unsupported_parameter",
        )
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
                f"audio.format {quote(body.audio.format)} is not supported; use one of {', '.join(AUDIO_OUTPUT_FORMATS)}",
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
        parameters=_parameters(body, body.max_completion_tokens, max_new_tokens_limit),
        generation_mode=mode,
        speaker=(body.audio.voice or "") if body.audio else "",
    )
    mm = body.mm_processor_kwargs
    if mm is not None:
        if mm.fps is not None:
            request.video.fps = _float32(
                "mm_processor_kwargs.fps", mm.fps, mm.fps > 0, "it must be a number greater than 0"
            )
        request.video.load_audio_from_video = mm.use_audio_in_video
    include_usage, continuous = _usage_options(body)
    options = ChatOptions(
        stream=bool(body.stream),
        include_usage=include_usage,
        audio_format=audio_format,
        voice=body.audio.voice if body.audio else None,
        continuous_usage=continuous,
    )
    return request, options


def completion_request(
    body: CompletionRequest, max_new_tokens_limit: int | None = None
) -> tuple[gw.GenerateRequest, CompletionOptions]:
    """An OpenAI text completion request as the public GenerateRequest: the prompt is one user message."""
    _refuse_unsupported(body)
    if body.logprobs is not None:
        _refuse("logprobs", "")
    prompt = body.prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise InvalidParam(
                f"prompt is a list of {len(prompt)} prompts; it must be one string (or a list of one string): "
                "Omnigate answers one prompt per request",
                "prompt",
            )
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise InvalidParam(
            "prompt is a list of token ids; it must be text (a string, or a list of one string)",
            "prompt",
            "unsupported_parameter",
        )
    if not isinstance(prompt, str):
        raise InvalidParam(
            "prompt is missing or not text; it must be a string (or a list of one string)", "prompt"
        )
    if not prompt:
        raise InvalidParam("prompt is empty; send the text to complete", "prompt")
    request = gw.GenerateRequest(
        messages=[gw.Message(role="user", content=[gw.ContentPart(text=prompt)])],
        parameters=_parameters(body, None, max_new_tokens_limit),
        generation_mode=gw.GENERATION_MODE_TEXT,
    )
    include_usage, continuous = _usage_options(body)
    options = CompletionOptions(
        stream=bool(body.stream),
        include_usage=include_usage,
        continuous_usage=continuous,
        echo=prompt if body.echo else None,
    )
    return request, options


def _usage_options(body: _GenerationBody) -> tuple[bool, bool]:
    """(include_usage, continuous_usage) from stream_options, which only a streamed request may set."""
    so = body.stream_options
    if so is None:
        return False, False
    if not body.stream:
        raise InvalidParam("stream_options is only allowed when stream is true", "stream_options")
    return bool(so.include_usage or so.continuous_usage_stats), bool(so.continuous_usage_stats)


def _refuse(param: str, why: str) -> None:
    raise InvalidParam(f"{param} is not supported by Omnigate{why}", param, "unsupported_parameter")


def _refuse_unsupported(body: _GenerationBody) -> None:
    for name, (accepted, why) in _ONE_VALUE.items():
        value = getattr(body, name, None)
        if value is not None and not any(_same(value, a) for a in accepted):
            raise InvalidParam(
                f"{name} is {_shown(value)}; it must be {json.dumps(accepted[0])} ({why})",
                name,
                "unsupported_parameter",
            )
    for name in _UNSUPPORTED:
        value = getattr(body, name, None)
        if value not in (None, [], {}, ""):
            _refuse(name, "")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None and value != 0:
            raise InvalidParam(
                f"{name} is {_shown(value)}; it must be 0: use repetition_penalty (> 1 discourages repetition)",
                name,
                "unsupported_parameter",
            )
    if body.response_format and body.response_format.get("type", "text") != "text":
        _refuse("response_format", '; only {"type": "text"}')


def _same(value: object, accepted: object) -> bool:
    """``value`` is ``accepted`` as JSON means it (1 and 1.0 are the same number; true is not 1)."""
    if isinstance(accepted, bool) or isinstance(value, bool):
        return value is accepted
    return isinstance(value, int | float) and value == accepted


def _shown(value: object) -> str:
    """A value as a message shows it: JSON's spelling for true/false/null, numbers cut, strings quoted."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        return number_shown(value)
    return quote(value if isinstance(value, str) else json.dumps(value, default=str))


def number_shown(value: int | float) -> str:
    """A number as a message shows it (a client may send a 10,000-digit integer: str() refuses those)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return _cut(repr(value), 32)


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


def _part(part: ContentPart, param: str) -> gw.ContentPart:
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
                f"{param}.input_audio.format {quote(part.input_audio.format)} is not supported; use one of "
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


@overload
def _integer(name: str, value: int, low: int, high: int, allowed: str | None = None) -> int: ...
@overload
def _integer(name: str, value: None, low: int, high: int, allowed: str | None = None) -> None: ...
@overload
def _integer(name: str, value: int | None, low: int, high: int, allowed: str | None = None) -> int | None: ...
def _integer(name: str, value: int | None, low: int, high: int, allowed: str | None = None) -> int | None:
    """``value`` when it is within [low, high]; else a 400 naming the parameter and the range."""
    if value is None or low <= value <= high:
        return value
    raise InvalidParam(f"{name} is {number_shown(value)}; it must be {allowed or _between(low, high)}", name)


def _between(low: int, high: int) -> str:
    return f"an integer between {low} and {high}"


def _float32(name: str, value: float, in_range: bool, allowed: str) -> float:
    """``value`` when it is finite, ``in_range`` and survives float32 (the wire type) as itself, not as 0,
    a denormal or infinity; else a 400 naming the parameter."""
    representable = value == 0 or FLOAT32_MIN_NORMAL <= abs(value) <= FLOAT32_MAX
    if math.isfinite(value) and in_range and representable:
        return value
    raise InvalidParam(f"{name} is {number_shown(value)}; {allowed}", name)


def _parameters(
    body: _GenerationBody, max_completion_tokens: int | None, max_new_tokens_limit: int | None
) -> gw.GenerationParameters:
    """The request's generation parameters, each checked against its domain first."""
    p = gw.GenerationParameters()
    limit = min(max_new_tokens_limit or UINT32_MAX, UINT32_MAX)
    _integer("max_tokens", body.max_tokens, 1, limit)
    _integer("max_completion_tokens", max_completion_tokens, 1, limit)
    max_tokens = max_completion_tokens or body.max_tokens
    if max_tokens:
        p.max_new_tokens = max_tokens
    top_k = _integer(
        "top_k",
        body.top_k,
        -1,
        validation.MAX_TOP_K,
        f"-1 or 0 (no cut-off) or {_between(1, validation.MAX_TOP_K)}",
    )
    top_k = top_k if top_k and top_k > 0 else None
    temperature = body.temperature
    if temperature is not None:
        _float32(
            "temperature",
            temperature,
            temperature == 0 or validation.MIN_TEMPERATURE <= temperature <= MAX_HTTP_TEMPERATURE,
            f"it must be 0 (greedy) or between {validation.MIN_TEMPERATURE:g} and {MAX_HTTP_TEMPERATURE:g}",
        )
    if body.top_p is not None:
        _float32("top_p", body.top_p, 0 < body.top_p <= 1, "it must be greater than 0 and at most 1")
    if temperature is not None:
        sample = temperature > 0
    else:
        sample = (body.top_p is not None and body.top_p < 1) or top_k is not None
    p.do_sample = sample
    if sample:
        if temperature is not None:
            p.temperature = temperature
        if body.top_p is not None:
            p.top_p = body.top_p
        if top_k is not None:
            p.top_k = top_k
    rp = body.repetition_penalty
    if rp is not None:
        p.repetition_penalty = _float32(
            "repetition_penalty",
            rp,
            validation.MIN_REPETITION_PENALTY <= rp <= validation.MAX_REPETITION_PENALTY,
            f"it must be between {validation.MIN_REPETITION_PENALTY:g} and "
            f"{validation.MAX_REPETITION_PENALTY:g} (1 = no penalty)",
        )
    if body.seed is not None:
        p.seed = _integer("seed", body.seed, MIN_SEED, validation.MAX_SEED) % 2**64
    if body.stop:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        p.stop.extend(s for s in stops if s)
    min_tokens = _integer("min_tokens", body.min_tokens, 0, limit)
    if min_tokens and max_tokens and min_tokens > max_tokens:
        name = "max_completion_tokens" if max_completion_tokens else "max_tokens"
        raise InvalidParam(
            f"min_tokens is {min_tokens}; it must not exceed {name} ({max_tokens})", "min_tokens"
        )
    if min_tokens:
        p.min_new_tokens = min_tokens
    p.ignore_eos = bool(body.ignore_eos)
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


def image_result(
    image: gw.GeneratedImage, output_format: str, size: tuple[int, int] | None
) -> tuple[bytes, int, int]:
    """The generated image in the requested format and size (Pillow; PNG as generated needs no work)."""
    if output_format == "png" and size is None and image.mime_type == "image/png":
        return image.data, image.width, image.height
    from PIL import Image

    with Image.open(io.BytesIO(image.data)) as opened:
        picture = opened.convert("RGB")
        if size is not None and picture.size != size:
            picture = picture.resize(size, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        picture.save(out, format=IMAGE_OUTPUT_FORMATS[output_format])
        return out.getvalue(), picture.width, picture.height


def model_object(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "omnigate"}
