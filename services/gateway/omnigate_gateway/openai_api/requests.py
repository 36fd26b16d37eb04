"""OpenAI's requests as the gateway's public ``GenerateRequest`` (the same message the gRPC API takes), plus
what the answer needs to know (``ChatOptions``, ``CompletionOptions``); pure functions, no I/O.

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
- ``/v1/audio/speech``: ``input`` becomes one user message asking the model to say it (``SPEECH_PROMPT``,
  with ``instructions`` after it), in audio mode, with ``voice`` as the model's speaker (``speech_request``);
- ``/v1/audio/transcriptions``: the uploaded audio (inline bytes) and ``TRANSCRIPTION_PROMPT`` (with the
  ``language`` and ``prompt`` when given) become one user message, in text mode (``transcription_request``);
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
import json
import math
import re
from dataclasses import dataclass
from typing import overload

from pydantic import ValidationError

from omnigate import validation
from omnigate.conversation import Modality, ModelInfo
from omnigate.errors import quote
from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate_gateway.openai_api.errors import InvalidParam, number_shown, validation_error
from omnigate_gateway.openai_api.protocol import (
    AUDIO_INPUT_MIME,
    AUDIO_OUTPUT_FORMATS,
    IMAGE_OUTPUT_FORMATS,
    SPEECH_OUTPUT_FORMATS,
    TRANSCRIPTION_RESPONSE_FORMATS,
    AudioPart,
    AudioURLPart,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    GenerationBody,
    ImageGenerationRequest,
    ImagePart,
    SpeechRequest,
    SpeechVoice,
    TextPart,
    TranscriptionRequest,
    VideoPart,
)

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


def _usage_options(body: GenerationBody) -> tuple[bool, bool]:
    """(include_usage, continuous_usage) from stream_options, which only a streamed request may set."""
    so = body.stream_options
    if so is None:
        return False, False
    if not body.stream:
        raise InvalidParam("stream_options is only allowed when stream is true", "stream_options")
    return bool(so.include_usage or so.continuous_usage_stats), bool(so.continuous_usage_stats)


def _refuse(param: str, why: str) -> None:
    raise InvalidParam(f"{param} is not supported by Omnigate{why}", param, "unsupported_parameter")


def _refuse_unsupported(body: GenerationBody) -> None:
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
    body: GenerationBody, max_completion_tokens: int | None, max_new_tokens_limit: int | None
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


# What the model is asked. An omni model answers a conversation (it has no read-out mode), so the speech
# route asks it, in one user message, to say the text and nothing else; whether the answer is that text
# word for word is up to the model (a small or chatty one may paraphrase or reply to it instead).
SPEECH_PROMPT = "Say the following text aloud, word for word, exactly as it is written, and say nothing else."
SPEECH_INSTRUCTIONS = "How to say it: {instructions}"
TRANSCRIPTION_PROMPT = "Transcribe the speech in this audio word for word. Answer with the transcript only."
TRANSCRIPTION_LANGUAGE = "The speech is in the language whose ISO-639-1 code is {language}."
TRANSCRIPTION_CONTEXT = "Text that may come just before this audio (follow its spelling and style): {prompt}"
MAX_SPEECH_INPUT_CHARS = 4096  # OpenAI's limit on ``input``
# OpenAI's refused transcription formats: the model gives neither timestamps nor speakers.
_TIMED_TRANSCRIPTION_FORMATS = ("verbose_json", "srt", "vtt", "diarized_json")
_LANGUAGE_CODE = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})?")


@dataclass
class TranscriptionOptions:
    """What the HTTP layer needs to know about a transcription request besides the GenerateRequest."""

    response_format: str  # "json" or "text"
    stream: bool


def speech_request(body: SpeechRequest, info: ModelInfo | None) -> tuple[gw.GenerateRequest, str]:
    """``POST /v1/audio/speech`` as a GenerateRequest in audio mode (one user message asking the model to
    say ``input``: ``SPEECH_PROMPT``), and the response format. ``info``: the served model (None while no
    worker is ready: the core then answers 503), whose speech output and voices are checked here."""
    if not body.input.strip():
        raise InvalidParam("input is empty; send the text to say", "input")
    if len(body.input) > MAX_SPEECH_INPUT_CHARS:
        raise InvalidParam(
            f"input has {len(body.input)} characters; the limit is {MAX_SPEECH_INPUT_CHARS}", "input"
        )
    response_format = body.response_format or "mp3"
    if response_format not in SPEECH_OUTPUT_FORMATS:
        raise InvalidParam(
            f"response_format {quote(response_format)} is not supported; use one of "
            f"{', '.join(SPEECH_OUTPUT_FORMATS)}",
            "response_format",
        )
    if body.speed is not None and body.speed != 1:
        raise InvalidParam(
            f"speed is {number_shown(body.speed)}; it must be 1.0 (Omnigate speaks at the model's own pace)",
            "speed",
            "unsupported_parameter",
        )
    if body.stream_format not in (None, "audio"):
        raise InvalidParam(
            f'stream_format {quote(body.stream_format)} is not supported; use "audio" (the audio is '
            "always streamed as it is generated, with chunked transfer)",
            "stream_format",
            "unsupported_parameter",
        )
    speaker = ""
    if info is not None:
        if Modality.AUDIO not in info.output_modalities:
            raise InvalidParam(
                f"the model {info.model_id} cannot generate speech (it generates "
                f"{', '.join(m.value for m in info.output_modalities)}); /v1/audio/speech needs a model with "
                "speech output",
                "model",
            )
        speaker = speech_voice(body.voice, info.speakers)
    text = SPEECH_PROMPT
    if body.instructions and body.instructions.strip():
        text += "\n" + SPEECH_INSTRUCTIONS.format(instructions=body.instructions.strip())
    text += "\n\n" + body.input
    limit = min(info.max_new_tokens if info is not None and info.max_new_tokens else UINT32_MAX, UINT32_MAX)
    parameters = gw.GenerationParameters()
    max_new_tokens = _integer("max_new_tokens", body.max_new_tokens, 1, limit)
    if max_new_tokens:
        parameters.max_new_tokens = max_new_tokens
    if body.seed is not None:
        parameters.seed = _integer("seed", body.seed, MIN_SEED, validation.MAX_SEED) % 2**64
    request = gw.GenerateRequest(
        messages=[gw.Message(role="user", content=[gw.ContentPart(text=text)])],
        parameters=parameters,
        generation_mode=gw.GENERATION_MODE_AUDIO,
        speaker=speaker,
    )
    return request, response_format


def speech_voice(voice: str | SpeechVoice | None, speakers: list[str]) -> str:
    """The model's speaker for a ``voice`` (a name or ``{"id": name}``, case-insensitive); "" (the model's
    default) when none is given or the model names no voices; a 400 naming the voices for another name."""
    name = voice.id if isinstance(voice, SpeechVoice) else voice
    if not name or not speakers:
        return ""
    speaker = pick_voice(name, speakers)
    if speaker not in speakers:
        param = "voice.id" if isinstance(voice, SpeechVoice) else "voice"
        raise InvalidParam(
            f"voice {quote(name)} is not one of the model's voices; use one of {', '.join(speakers)}", param
        )
    return speaker


def transcription_fields(fields: list[tuple[str, str]]) -> TranscriptionRequest:
    """A multipart body's text fields (all but ``file``) as a TranscriptionRequest; a 400 naming the field
    otherwise. Array fields come as ``name[]`` (what the openai SDK sends) or as a repeated name."""
    values: dict[str, str | list[str]] = {}
    for name, value in fields:
        key = name.removesuffix("[]")
        if name.endswith("[]") or key in values:
            previous = values.get(key, [])
            values[key] = [*(previous if isinstance(previous, list) else [previous]), value]
        else:
            values[key] = value
    try:
        return TranscriptionRequest.model_validate(values)
    except ValidationError as exc:
        raise validation_error([dict(e) for e in exc.errors()]) from None


def transcription_request(
    body: TranscriptionRequest, audio: bytes, info: ModelInfo | None
) -> tuple[gw.GenerateRequest, TranscriptionOptions]:
    """``POST /v1/audio/transcriptions`` as a GenerateRequest in text mode: one user message with the audio
    (inline bytes, decoded by the gateway's media path like any inline audio) and ``TRANSCRIPTION_PROMPT``
    (plus the language and the prompt when given)."""
    if not audio:
        raise InvalidParam("file is empty; send the audio to transcribe", "file")
    response_format = body.response_format or "json"
    if response_format in _TIMED_TRANSCRIPTION_FORMATS:
        raise InvalidParam(
            f"response_format {quote(response_format)} is not supported: the model gives no timestamps or "
            f"speakers; use one of {', '.join(TRANSCRIPTION_RESPONSE_FORMATS)}",
            "response_format",
            "unsupported_parameter",
        )
    if response_format not in TRANSCRIPTION_RESPONSE_FORMATS:
        raise InvalidParam(
            f"response_format {quote(response_format)} is not supported; use one of "
            f"{', '.join(TRANSCRIPTION_RESPONSE_FORMATS)}",
            "response_format",
        )
    for name in (
        "include",
        "timestamp_granularities",
        "chunking_strategy",
        "keywords",
        "languages",
        "known_speaker_names",
        "known_speaker_references",
    ):
        if getattr(body, name) not in (None, [], ""):
            _refuse(name, " for transcriptions")
    if info is not None and Modality.AUDIO not in info.input_modalities:
        raise InvalidParam(
            f"the model {info.model_id} cannot take audio input (it takes "
            f"{', '.join(m.value for m in info.input_modalities)}); /v1/audio/transcriptions needs a model "
            "that takes audio",
            "model",
        )
    text = TRANSCRIPTION_PROMPT
    if body.language:
        if not _LANGUAGE_CODE.fullmatch(body.language):
            raise InvalidParam(
                f"language is {quote(body.language)}; it must be an ISO-639-1 code such as en or de",
                "language",
            )
        text += " " + TRANSCRIPTION_LANGUAGE.format(language=body.language)
    if body.prompt and body.prompt.strip():
        text += "\n" + TRANSCRIPTION_CONTEXT.format(prompt=body.prompt.strip())
    parameters = gw.GenerationParameters()
    limit = min(info.max_new_tokens if info is not None and info.max_new_tokens else UINT32_MAX, UINT32_MAX)
    max_new_tokens = _integer("max_new_tokens", body.max_new_tokens, 1, limit)
    if max_new_tokens:
        parameters.max_new_tokens = max_new_tokens
    temperature = body.temperature
    if temperature is not None:
        _float32(
            "temperature",
            temperature,
            temperature == 0 or validation.MIN_TEMPERATURE <= temperature <= 1,
            f"it must be 0 (greedy) or between {validation.MIN_TEMPERATURE:g} and 1",
        )
        if temperature > 0:
            parameters.do_sample = True
            parameters.temperature = temperature
    audio_part = gw.ContentPart(audio=gw.MediaSource(inline=gw.InlineMedia(data=audio)))
    request = gw.GenerateRequest(
        messages=[gw.Message(role="user", content=[audio_part, gw.ContentPart(text=text)])],
        parameters=parameters,
        generation_mode=gw.GENERATION_MODE_TEXT,
    )
    return request, TranscriptionOptions(response_format=response_format, stream=bool(body.stream))
