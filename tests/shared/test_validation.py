"""The one parameter rule both doors apply: every value outside its domain is refused with a message that
names the parameter and the allowed range, short whatever was sent; accepted values cannot make the
sampling probabilities NaN."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper

from omnigate import validation
from omnigate.conversation import ContentPart, GenerationParams, GenerationRequest, Message, Modality
from omnigate.errors import InvalidInput, LimitExceeded

LIMITS = validation.RequestLimits(max_messages=8, max_content_parts=16)
BASE = GenerationParams(max_new_tokens=16, do_sample=True)

BAD = [
    ("temperature", -1.0),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", 5e-324),  # denormal
    ("temperature", 1e-30),  # in float range, but logits / 1e-30 overflow to inf
    ("temperature", 1e6),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("top_p", -0.1),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.nan),
    ("repetition_penalty", 1e-38),
    ("repetition_penalty", math.inf),
    ("max_new_tokens", 0),
    ("max_new_tokens", 2**64),
    ("max_new_tokens", -5),
    ("min_new_tokens", -1),
    ("min_new_tokens", 2**80),
    ("top_k", -1),
    ("top_k", 2**40),
    ("seed", -1),
    ("seed", 2**64),
]


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_out_of_domain_values_are_refused_by_name(name, value):
    with pytest.raises(InvalidInput) as info:
        validation.checked_params(dataclasses.replace(BASE, **{name: value}))
    message = str(info.value)
    assert message.startswith(f"{name} is ")
    assert "must be" in message
    assert len(message) < 200


def test_a_huge_integer_is_not_printed():
    with pytest.raises(InvalidInput) as info:
        validation.checked_params(dataclasses.replace(BASE, max_new_tokens=10**5000))
    assert "an integer of" in str(info.value) and len(str(info.value)) < 200


def test_min_new_tokens_above_max_is_refused():
    with pytest.raises(InvalidInput, match="min_new_tokens"):
        validation.checked_params(dataclasses.replace(BASE, min_new_tokens=17))


def test_the_limit_bounds_max_new_tokens():
    with pytest.raises(InvalidInput, match="between 1 and 8"):
        validation.checked_params(BASE, max_new_tokens_limit=8)


def test_temperature_zero_means_greedy():
    params = validation.checked_params(dataclasses.replace(BASE, temperature=0.0))
    assert params.do_sample is False and params.temperature is None


@pytest.mark.parametrize("stop", [[""], ["x" * 5000], ["a"] * 17, ["ok\ud800"]])
def test_bad_stop_strings_are_refused(stop):
    with pytest.raises(InvalidInput, match=r"stop"):
        validation.checked_params(dataclasses.replace(BASE, stop=stop))


def _request(*texts: str, role: str = "user", speaker: str | None = None) -> GenerationRequest:
    return GenerationRequest(
        messages=[Message(role, [ContentPart(Modality.TEXT, text=t) for t in texts])],
        params=BASE,
        speaker=speaker,
    )


def test_lone_surrogates_are_refused_with_their_place():
    with pytest.raises(
        InvalidInput, match=r"message 0 part 1 text contains an unpaired UTF-16 surrogate \(U\+D83D"
    ):
        validation.check_request(_request("fine", "bad \ud83d here"), LIMITS, None)


@pytest.mark.parametrize("role", ["x" * 1_000_000, "", "user\n", "<script>"])
def test_roles_are_short_names(role):
    with pytest.raises(InvalidInput) as info:
        validation.check_request(_request("hi", role=role), LIMITS, None)
    assert len(str(info.value)) < 250


def test_long_speaker_names_are_refused_short():
    with pytest.raises(InvalidInput) as info:
        validation.check_request(_request("hi", speaker="v" * 100_000), LIMITS, None)
    assert len(str(info.value)) < 250


def test_too_many_messages_or_parts_are_refused():
    with pytest.raises(LimitExceeded, match="9 messages; the limit is 8"):
        validation.check_counts(9, 9, LIMITS)
    with pytest.raises(LimitExceeded, match="17 content parts; the limit is 16"):
        validation.check_request(_request(*["t"] * 17), LIMITS, None)


finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=300, deadline=None)
@given(
    temperature=finite, penalty=finite, logits=st.lists(st.floats(-80, 80, width=32), min_size=4, max_size=4)
)
def test_accepted_values_never_make_probabilities_nan(temperature, penalty, logits):
    """What HF's own warpers do with an accepted temperature and repetition penalty stays a distribution."""
    try:
        params = validation.checked_params(
            dataclasses.replace(BASE, temperature=temperature, repetition_penalty=penalty)
        )
    except InvalidInput:
        return
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(params.repetition_penalty)])
    if params.do_sample:
        processors.append(TemperatureLogitsWarper(params.temperature))
    scores = processors(torch.tensor([[0, 1]]), torch.tensor([logits], dtype=torch.float32))
    probs = torch.softmax(scores, dim=-1)
    assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-3


@pytest.mark.parametrize(("name", "value"), [("temperature", 1e-5), ("repetition_penalty", 0.01)])
def test_the_documented_minimum_is_accepted_as_float32_carries_it(name, value):
    """A protobuf float field carries 1e-5 as 9.99999975e-06: still the minimum, not under it."""
    carried = float(np.float32(value))
    assert carried < value
    validation.checked_params(dataclasses.replace(BASE, **{name: carried}))
