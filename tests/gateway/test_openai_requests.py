"""OpenAI request bodies (openai_api.protocol) as the gateway's public GenerateRequest (openai_api.requests):
pure translation, no servers."""

from __future__ import annotations

import base64

import pydantic
import pytest

from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate_gateway.openai_api.errors import InvalidParam, http_error, validation_error
from omnigate_gateway.openai_api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ImageGenerationRequest,
    refuse_invalid_unicode,
)
from omnigate_gateway.openai_api.requests import (
    ChatOptions,
    CompletionOptions,
    chat_request,
    completion_request,
    image_request,
    model_matches,
    pick_voice,
)
from omnigate_gateway.openai_api.responses import model_object


def chat(**body) -> tuple[gw.GenerateRequest, ChatOptions]:
    body.setdefault("messages", [{"role": "user", "content": "Hi"}])
    return chat_request(ChatCompletionRequest.model_validate(body))


def invalid(body: dict) -> InvalidParam:
    """The 400 a body gets, whether pydantic or the translation refuses it."""
    try:
        chat_request(ChatCompletionRequest.model_validate(body))
    except pydantic.ValidationError as e:
        return validation_error(e.errors())
    except InvalidParam as e:
        return e
    raise AssertionError(f"{body} was accepted")


def test_content_parts_become_public_parts():
    wav = b"RIFF....WAVEfmt "
    request, options = chat(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look:"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
                    {"type": "image_url", "image_url": "data:image/png;base64,iVBORw0KGgo="},
                    {
                        "type": "input_audio",
                        "input_audio": {"data": base64.b64encode(wav).decode(), "format": "WAV"},
                    },
                    {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
                    {"type": "audio_url", "audio_url": {"url": " https://example.com/s.mp3 "}},
                ],
            },
            {"role": "assistant", "content": "Earlier answer", "refusal": None},
        ]
    )
    system, user, assistant = request.messages
    assert (system.role, system.content[0].text) == ("system", "Be brief.")  # developer = system
    kinds = [p.WhichOneof("part") for p in user.content]
    assert kinds == ["text", "image", "image", "audio", "video", "audio"]
    assert user.content[1].image.url == "https://example.com/a.png"
    assert user.content[2].image.url.startswith("data:image/png;base64,")
    assert user.content[3].audio.inline.data == wav
    assert user.content[3].audio.inline.mime_type == "audio/wav"
    assert user.content[4].video.url == "https://example.com/v.mp4"
    assert user.content[5].audio.url == "https://example.com/s.mp3"
    assert (assistant.role, assistant.content[0].text) == ("assistant", "Earlier answer")
    assert request.generation_mode == gw.GENERATION_MODE_TEXT
    assert options == ChatOptions(stream=False, include_usage=False, audio_format=None, voice=None)


def test_sampling_parameters():
    p = chat(
        max_tokens=7,
        temperature=0.7,
        top_p=0.9,
        stop="END",
        seed=-1,
        top_k=20,
        repetition_penalty=1.1,
        min_tokens=2,
    )[0].parameters
    assert p.max_new_tokens == 7 and p.do_sample
    assert p.temperature == pytest.approx(0.7) and p.top_p == pytest.approx(0.9) and p.top_k == 20
    assert p.repetition_penalty == pytest.approx(1.1) and p.min_new_tokens == 2
    assert list(p.stop) == ["END"] and p.seed == 2**64 - 1
    # max_completion_tokens (the newer name) wins; temperature 0 is greedy and drops the sampling knobs.
    p = chat(max_tokens=7, max_completion_tokens=3, temperature=0, top_p=0.5, stop=["a", "b"])[0].parameters
    assert (
        p.max_new_tokens == 3 and not p.do_sample and not p.HasField("top_p") and list(p.stop) == ["a", "b"]
    )
    # Nothing set: greedy, and the gateway's default length (0 here).
    p = chat()[0].parameters
    assert not p.do_sample and p.max_new_tokens == 0 and not p.HasField("seed")
    assert chat(top_p=0.8)[0].parameters.do_sample


def test_speech_output_and_video_options():
    request, options = chat(
        modalities=["text", "audio"],
        audio={"voice": "ethan", "format": "pcm16"},
        stream=True,
        stream_options={"include_usage": True},
        mm_processor_kwargs={"fps": 1, "use_audio_in_video": True},
    )
    assert request.generation_mode == gw.GENERATION_MODE_AUDIO and request.speaker == "ethan"
    assert request.video.fps == 1 and request.video.load_audio_from_video
    assert options == ChatOptions(stream=True, include_usage=True, audio_format="pcm16", voice="ethan")
    assert pick_voice("ethan", ["Chelsie", "Ethan"]) == "Ethan"
    assert pick_voice("Nobody", ["Chelsie", "Ethan"]) == "Nobody"  # the worker refuses it, listing voices
    assert pick_voice(None, ["Chelsie"]) == ""


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "'user'"),
        ({"messages": [{"role": "user", "content": [{"type": "file"}]}]}, "messages[0].content[0]", "'file'"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].image_url.url",
            "required",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "!!", "format": "wav"}}],
                    }
                ]
            },
            "messages[0].content[0].input_audio.data",
            "base64",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "midi"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].input_audio.format",
            "wav",
        ),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", "empty"),
        (
            {"messages": [{"role": "assistant", "audio": {"id": "audio_1"}}]},
            "messages[0].audio",
            "transcript",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}, "frobnicate", "Unrecognized"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n", "it must be 1"),
        (
            {"messages": [{"role": "user", "content": "x"}], "temperature": 3},
            "temperature",
            "between 1e-05 and 2",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", "between 1 and"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs", "not supported"),
        (
            {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1},
            "presence_penalty",
            "repetition_penalty",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "tools",
            "not supported",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
            "response_format",
            "text",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "modalities": ["text", "audio"]}, "audio", "voice"),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "modalities": ["text", "audio"],
                "audio": {"format": "mp3"},
            },
            "audio.format",
            "wav, pcm16",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "audio": {"format": "wav"}}, "modalities", "audio"),
        (
            {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
            "stream_options",
            "stream",
        ),
    ],
)
def test_bad_requests_name_the_parameter(body, param, words):
    error = invalid(body)
    assert error.param == param
    assert words in error.message
    status = http_error(error)
    assert status.status == 400
    assert status.body == {
        "error": {
            "message": error.message,
            "type": "invalid_request_error",
            "param": param,
            "code": error.error_code,
        }
    }


def test_ignored_parameters_are_accepted():
    request, _ = chat(
        user="u1",
        metadata={"a": "b"},
        store=False,
        service_tier="auto",
        parallel_tool_calls=False,
        tool_choice="none",
    )
    assert request.messages[0].content[0].text == "Hi"


def test_image_requests():
    request, fmt, size = image_request(
        ImageGenerationRequest(prompt="A red square", size="64x32", output_format="jpeg")
    )
    assert request.generation_mode == gw.GENERATION_MODE_IMAGE
    assert request.messages[0].content[0].text == "A red square"
    assert (fmt, size) == ("jpeg", (64, 32))
    assert image_request(ImageGenerationRequest(prompt="x", size="auto", response_format="b64_json"))[1:] == (
        "png",
        None,
    )
    for body, param in [
        ({"n": 2}, "n"),
        ({"response_format": "url"}, "response_format"),
        ({"size": "big"}, "size"),
        ({"size": "99999x2"}, "size"),
        ({"output_format": "svg"}, "output_format"),
        ({"stream": True}, "stream"),
    ]:
        with pytest.raises(InvalidParam) as err:
            image_request(ImageGenerationRequest(prompt="x", **body))
        assert err.value.param == param


def test_model_names():
    assert model_matches(None, "models/tiny-qwen2.5-omni")
    assert model_matches("models/tiny-qwen2.5-omni", "models/tiny-qwen2.5-omni")
    assert model_matches("tiny-qwen2.5-omni", "/abs/models/tiny-qwen2.5-omni")
    assert model_matches("Qwen2.5-Omni-3B", "Qwen/Qwen2.5-Omni-3B")
    assert not model_matches("gpt-4o", "Qwen/Qwen2.5-Omni-3B")
    assert model_object("m", 3) == {"id": "m", "object": "model", "created": 3, "owned_by": "omnigate"}


def test_vllm_extensions_become_parameters():
    p = chat(max_tokens=5, ignore_eos=True, top_k=-1, seed=-(2**63), min_tokens=0)[0].parameters
    assert p.ignore_eos and p.max_new_tokens == 5 and not p.HasField("top_k") and not p.do_sample
    assert p.seed == 2**63
    # accepted at the value that matches what Omnigate does
    chat(
        skip_special_tokens=True,
        include_stop_str_in_output=False,
        spaces_between_special_tokens=False,
        best_of=1,
        n=1.0,
        length_penalty=1.0,
        min_p=0.0,
        use_beam_search=False,
        stop_token_ids=[],
        priority=3,
        cache_salt="abc",
        add_generation_prompt=True,
        continue_final_message=False,
    )
    assert not chat()[0].parameters.ignore_eos


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        (
            {"max_tokens": 2**70},
            "max_tokens",
            "is an integer of 71 bits; it must be an integer between 1 and",
        ),
        ({"max_completion_tokens": 2**32}, "max_completion_tokens", "between 1 and 4294967295"),
        ({"top_k": 2**31}, "top_k", "-1 or 0 (no cut-off) or an integer between 1 and 2147483647"),
        ({"seed": 2**64}, "seed", "between -9223372036854775808 and 18446744073709551615"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "must not exceed max_tokens (4)"),
        (
            {"temperature": float("nan")},
            "temperature",
            "temperature is nan; it must be 0 (greedy) or between",
        ),
        ({"temperature": 5e-324}, "temperature", "temperature is 5e-324"),
        ({"top_p": 1e-45}, "top_p", "greater than 0 and at most 1"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty", "between 0.01 and 100"),
        ({"presence_penalty": float("nan")}, "presence_penalty", "it must be 0"),
        ({"mm_processor_kwargs": {"fps": 1e-300}}, "mm_processor_kwargs.fps", "greater than 0"),
        ({"n": True}, "n", "n is true; it must be 1"),
        ({"skip_special_tokens": False}, "skip_special_tokens", "it must be true"),
        ({"best_of": 2}, "best_of", "it must be 1"),
        ({"guided_regex": "a+"}, "guided_regex", "not supported"),
        ({"stream_options": {"continuous_usage_stats": True}}, "stream_options", "stream"),
        (
            {"messages": [{"role": "user", "content": "a\ud800"}]},
            "messages[0].content",
            "U+D800 at character 1",
        ),
        ({"stop": ["ok", "\udc00"]}, "stop[1]", "unpaired UTF-16 surrogate"),
        ({"\ud800x": 1}, None, "a key of the request body"),
        ({"metadata": {"\ud800": "x"}}, "metadata", "a key of metadata"),
        ({"x" * 5000: 1}, "x" * 64 + "... (5000 characters)", "Unrecognized"),
    ],
)
def test_parameters_outside_their_domain_name_the_parameter(extra, param, words):
    error = invalid({"messages": [{"role": "user", "content": "x"}], **extra})
    assert error.param == param and words in error.message, error.message
    assert len(error.message) < 300


def test_a_deeply_nested_body_is_checked_without_recursion():
    nested: list = []
    for _ in range(50_000):
        nested = [nested]
    refuse_invalid_unicode({"metadata": nested})
    with pytest.raises(InvalidParam):
        refuse_invalid_unicode({"metadata": [nested, "\ud800"]})


def completion(**body) -> tuple[gw.GenerateRequest, CompletionOptions]:
    return completion_request(CompletionRequest.model_validate(body))


def test_text_completion_requests():
    request, options = completion(prompt=["Once"], max_tokens=3, echo=True, stream=True, ignore_eos=True)
    assert [(m.role, m.content[0].text) for m in request.messages] == [("user", "Once")]
    assert request.generation_mode == gw.GENERATION_MODE_TEXT and request.parameters.ignore_eos
    assert options == CompletionOptions(stream=True, include_usage=False, continuous_usage=False, echo="Once")
    _, options = completion(prompt="x", stream=True, stream_options={"continuous_usage_stats": True})
    assert options.include_usage and options.continuous_usage
    for body, words in [
        ({"prompt": []}, "0 prompts"),
        ({"prompt": [[1, 2]]}, "token ids"),
        ({"prompt": 7}, "not text"),
        ({"prompt": "x", "logprobs": 0}, "logprobs"),
        ({"prompt": "x", "suffix": "!"}, "suffix"),
    ]:
        with pytest.raises(InvalidParam) as err:
            completion(**body)
        assert words in err.value.message
