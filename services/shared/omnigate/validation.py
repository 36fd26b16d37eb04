"""The one rule for what a generation request may ask for, applied by both doors: the gateway checks every
request once before any media is fetched, and the worker checks again what reaches it (another gateway
version, or a client calling the worker directly, may send anything the worker protocol can carry).

Every refusal is ``InvalidInput`` (INVALID_ARGUMENT / HTTP 400) naming the parameter and the allowed range,
quoting at most ``errors.QUOTE_LIMIT`` characters of what was sent.

The ranges are chosen so that no accepted value can make the sampling probabilities NaN or infinite (a
NaN there fails ``torch.multinomial``; on CUDA it is a device-side assert that takes the whole worker down):
the logits are float32, so dividing them by a temperature under 1e-5, or a repetition penalty under 0.01,
can overflow to infinity. A temperature of 0 means greedy decoding, as in OpenAI's API and vLLM.
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct
from dataclasses import dataclass

from omnigate.conversation import GenerationParams, GenerationRequest
from omnigate.errors import InvalidInput, LimitExceeded, quote

MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
MAX_TOP_K = 2**31 - 1
MAX_SEED = 2**64 - 1
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
ROLE_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
MAX_SPEAKER_CHARS = 128


def _float32(value: float) -> float:
    """``value`` as a protobuf ``float`` field carries it (1e-5 arrives as 9.99999975e-06)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


# The lower bounds as the wire can state them: a client sending exactly the documented minimum is accepted.
_MIN_TEMPERATURE_F32 = _float32(MIN_TEMPERATURE)
_MIN_REPETITION_PENALTY_F32 = _float32(MIN_REPETITION_PENALTY)


@dataclass(frozen=True)
class RequestLimits:
    """The shape limits of one request (settings of the service applying them)."""

    max_messages: int
    max_content_parts: int


def check_counts(messages: int, parts: int, limits: RequestLimits) -> None:
    """Refuses a request with more messages or content parts than allowed (checked before anything is
    built from them, so an oversized conversation costs nothing more)."""
    if messages > limits.max_messages:
        raise LimitExceeded(f"the conversation has {messages} messages; the limit is {limits.max_messages}")
    if parts > limits.max_content_parts:
        raise LimitExceeded(
            f"the conversation has {parts} content parts; the limit is {limits.max_content_parts}"
        )


def check_text(name: str, text: str) -> None:
    """Refuses text that is not valid Unicode (a lone UTF-16 surrogate, which no encoder can send on)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"{name} contains an unpaired UTF-16 surrogate (U+{ord(text[exc.start]):04X} at character "
            f"{exc.start}); send valid Unicode"
        ) from None


def check_role(index: int, role: str) -> None:
    if not role:
        raise InvalidInput(f"message {index} has no role; use system, user or assistant")
    if not ROLE_PATTERN.fullmatch(role):
        raise InvalidInput(
            f"message {index} has role {quote(role)}; a role is 1-32 letters, digits, '_' or '-' "
            "(system, user or assistant)"
        )


def check_speaker(speaker: str | None) -> None:
    if speaker is None:
        return
    check_text("speaker", speaker)
    if len(speaker) > MAX_SPEAKER_CHARS:
        raise InvalidInput(
            f"speaker is {quote(speaker)}; a speaker name has at most {MAX_SPEAKER_CHARS} characters"
        )


def checked_params(p: GenerationParams, max_new_tokens_limit: int | None = None) -> GenerationParams:
    """``p`` checked against each parameter's domain, normalized (temperature 0 = greedy); raises
    InvalidInput naming the first parameter out of range."""
    limit = max_new_tokens_limit or 2**32 - 1
    _check_int("max_new_tokens", p.max_new_tokens, 1, limit)
    _check_int("min_new_tokens", p.min_new_tokens, 0, limit)
    if p.min_new_tokens > p.max_new_tokens:
        raise InvalidInput(
            f"min_new_tokens ({p.min_new_tokens}) exceeds max_new_tokens ({p.max_new_tokens}); it must be "
            "between 0 and max_new_tokens"
        )
    do_sample = p.do_sample
    temperature = p.temperature
    if temperature is not None:
        if not (
            math.isfinite(temperature)
            and (temperature == 0 or _MIN_TEMPERATURE_F32 <= temperature <= MAX_TEMPERATURE)
        ):
            raise InvalidInput(
                f"temperature is {_number(temperature)}; it must be 0 (greedy) or between {MIN_TEMPERATURE:g} "
                f"and {MAX_TEMPERATURE:g}"
            )
        if temperature == 0:
            do_sample, temperature = False, None
    if p.top_p is not None and not (math.isfinite(p.top_p) and 0 < p.top_p <= 1):
        raise InvalidInput(f"top_p is {_number(p.top_p)}; it must be greater than 0 and at most 1")
    if p.top_k is not None:
        _check_int("top_k", p.top_k, 0, MAX_TOP_K)
    rp = p.repetition_penalty
    if rp is not None and not (
        math.isfinite(rp) and _MIN_REPETITION_PENALTY_F32 <= rp <= MAX_REPETITION_PENALTY
    ):
        raise InvalidInput(
            f"repetition_penalty is {_number(rp)}; it must be between {MIN_REPETITION_PENALTY:g} and "
            f"{MAX_REPETITION_PENALTY:g} (1 = no penalty)"
        )
    if p.seed is not None:
        _check_int("seed", p.seed, 0, MAX_SEED)
    if len(p.stop) > MAX_STOP_STRINGS:
        raise InvalidInput(f"stop has {len(p.stop)} strings; the limit is {MAX_STOP_STRINGS}")
    for i, stop in enumerate(p.stop):
        check_text(f"stop[{i}]", stop)
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise InvalidInput(
                f"stop[{i}] is {quote(stop)}; a stop string has 1 to {MAX_STOP_CHARS} characters"
            )
    return dataclasses.replace(p, do_sample=do_sample, temperature=temperature)


def check_request(
    request: GenerationRequest, limits: RequestLimits, max_new_tokens_limit: int | None
) -> None:
    """Checks a whole request (shape, roles, text, speaker, parameters); normalizes its parameters."""
    check_counts(len(request.messages), sum(len(m.content) for m in request.messages), limits)
    for i, message in enumerate(request.messages):
        check_role(i, message.role)
        for j, part in enumerate(message.content):
            if part.text is not None:
                check_text(f"message {i} part {j} text", part.text)
    check_speaker(request.speaker)
    request.params = checked_params(request.params, max_new_tokens_limit)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not (isinstance(value, int) and low <= value <= high):
        raise InvalidInput(f"{name} is {_number(value)}; it must be an integer between {low} and {high}")


def _number(value: object) -> str:
    """A number as a message shows it (cut: a client may send a 4,000-digit integer over JSON)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"  # str() of a huge int is slow, or refused
    text = repr(value)
    return text if len(text) <= 32 else f"{text[:24]}..."
