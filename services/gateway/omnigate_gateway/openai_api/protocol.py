"""OpenAI's request bodies as pydantic models (what ``/v1/chat/completions``, ``/v1/completions``,
``/v1/images/generations``, ``/v1/audio/speech`` and ``/v1/audio/transcriptions`` accept), and the formats
they name.

Every model refuses unknown keys (as OpenAI does) and every whole body refuses a string holding a lone UTF-16
surrogate before anything else (``refuse_invalid_unicode``). Numbers are typed loosely here: ``requests``
checks them against their domains with messages that name the parameter and its range.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from omnigate import validation
from omnigate_gateway.openai_api.errors import InvalidParam, cut


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
            f"{cut(where or 'the request body')} contains an unpaired UTF-16 surrogate "
            f"(U+{ord(text[exc.start]):04X} at character {exc.start}); send valid Unicode",
            cut(path) or None,
        ) from None


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


class GenerationBody(_Body):
    """The parameters chat and completions share: OpenAI's sampling parameters and vLLM's extensions.

    Numbers are typed loosely (no pydantic bounds) and checked by ``requests._parameters``, whose messages
    name the parameter and its range; parameters Omnigate honours only at one value are ``Any`` and checked
    against ``requests._ONE_VALUE``."""

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
    # vLLM's extensions: honoured at one value only (requests._ONE_VALUE)
    skip_special_tokens: Any = None
    include_stop_str_in_output: Any = None
    use_beam_search: Any = None
    best_of: Any = None
    length_penalty: Any = None
    min_p: Any = None
    return_tokens_as_token_ids: Any = None
    # vLLM's extensions: refused when set (requests._UNSUPPORTED)
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


class ChatCompletionRequest(GenerationBody):
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


class CompletionRequest(GenerationBody):
    """``POST /v1/completions`` (OpenAI's legacy text completions, what benchmark clients also use)."""

    prompt: Any = None  # checked by requests.completion_request: a string or a list of one string
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


class SpeechVoice(_Strict):
    """OpenAI's custom voice reference (``{"id": ...}``): the id names one of the model's voices."""

    id: str


class SpeechRequest(_Body):
    """``POST /v1/audio/speech``: OpenAI's text-to-speech body, plus vLLM-Omni's ``max_new_tokens`` and a
    ``seed`` (Omnigate's extensions). Formats, voice and speed are checked by ``requests.speech_request``."""

    input: str
    model: str | None = None
    voice: str | SpeechVoice | None = None
    response_format: str | None = None
    speed: float | None = None
    instructions: str | None = None
    stream_format: str | None = None
    # extensions
    max_new_tokens: int | None = None
    seed: int | None = None


class TranscriptionRequest(_Body):
    """``POST /v1/audio/transcriptions``: the form fields of OpenAI's multipart body besides ``file`` (form
    values are strings: pydantic reads the numbers and booleans from them), plus ``max_new_tokens``
    (Omnigate's extension). Checked by ``requests.transcription_request``."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    response_format: str | None = None
    temperature: float | None = None
    stream: bool | None = None
    # refused when set (requests.transcription_request)
    include: list[str] | None = None
    timestamp_granularities: list[str] | None = None
    chunking_strategy: Any = None
    keywords: Any = None
    languages: Any = None
    known_speaker_names: Any = None
    known_speaker_references: Any = None
    # extension
    max_new_tokens: int | None = None


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
# /v1/audio/speech's response_format values (encoding.SPEECH_ENCODINGS says how each is made); OpenAI's
# default is mp3.
SPEECH_OUTPUT_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
TRANSCRIPTION_RESPONSE_FORMATS = ("json", "text")
IMAGE_OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
