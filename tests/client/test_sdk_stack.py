"""The sync and async SDK against the real stack: worker (tiny Qwen2.5-Omni) + gateway processes."""

from __future__ import annotations

import asyncio
import io
import time
import wave

import grpc
import numpy as np
import pytest

from omnigate_client import (
    AsyncOmnigateClient,
    AudioChunk,
    GenerationResult,
    ModelInfo,
    OmnigateClient,
    OmnigateClientError,
    Summary,
    TextDelta,
)

pytestmark = pytest.mark.slow


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def _check_text_result(result: GenerationResult, limit: int) -> None:
    assert result.text
    assert result.finish_reason in {"stop", "length"}
    assert 1 <= result.usage.output_tokens <= limit and result.usage.prompt_tokens > 10
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.output_tokens
    assert result.timings.total_s >= result.timings.generate_s > 0
    assert result.model_id.endswith("tiny-qwen2.5-omni")
    assert not result.audio and not result.images
    # The gateway's request id, when it sends one (x-request-id), is carried through.
    assert result.request_id is None or isinstance(result.request_id, str)


def test_sync_stream_of_typed_events_and_result(sdk_stack):
    with OmnigateClient(sdk_stack.gateway.target, timeout_s=120) as client:
        stream = client.generate(_user("Hello, how are you?"), max_new_tokens=8)
        events = list(stream)
        assert all(isinstance(e, TextDelta) for e in events[:-1]) and isinstance(events[-1], Summary)
        # How many deltas depends on load: a busy worker merges the deltas already waiting into one message
        # (scheduler.Job.events), which a loaded CI machine did for all 8 tokens.
        assert len(events) >= 2, "text, then the summary"
        assert stream.attempts == 1
        result = client.generate_all(_user("Hello, how are you?"), max_new_tokens=8)
    _check_text_result(result, 8)
    assert result.text == "".join(e.text for e in events[:-1]), "greedy: the same answer twice"


def test_sync_speech_result_is_pcm_and_wav(sdk_stack):
    with OmnigateClient(sdk_stack.gateway.target, timeout_s=120) as client:
        result = client.generate_all(_user("Say hello."), generation_mode="audio", max_new_tokens=4)
    audio = result.audio
    assert audio and all(isinstance(c, AudioChunk) for c in audio)
    assert audio.sample_rate == 24000 and audio.channels == 1
    assert audio.pcm.dtype == np.int16 and audio.pcm.ndim == 1
    assert audio.seconds == pytest.approx(result.summary.audio_seconds, abs=0.01)
    assert float(np.sqrt(np.mean(audio.samples**2))) > 1e-3, "audible"
    with wave.open(io.BytesIO(result.to_wav())) as w:
        assert w.getframerate() == 24000 and w.getnframes() == len(audio.pcm)
        assert w.readframes(w.getnframes()) == audio.pcm_bytes


def test_sync_model_info_is_typed(sdk_stack):
    with OmnigateClient(sdk_stack.gateway.target) as client:
        info = client.model_info()
    assert isinstance(info, ModelInfo)
    assert set(info.input_modalities) == {"text", "image", "audio", "video"}
    assert set(info.output_modalities) == {"text", "audio"} and info.speakers == ["Chelsie", "Ethan"]
    assert info.limits["max_new_tokens"] > 0 and info["model_id"] == info.model_id


def test_sync_error_is_typed_and_not_retried(sdk_stack):
    with OmnigateClient(sdk_stack.gateway.target) as client:
        started = time.monotonic()
        with pytest.raises(OmnigateClientError) as err:
            client.generate_all(_user("hi"), generation_mode="image")
    error = err.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.attempts == 1
    assert "cannot generate image" in error.message and error.domain == "omnigate.dev" and error.reason
    assert error.retry_after is None
    assert time.monotonic() - started < 10


def test_sync_deadline_is_respected(sdk_stack):
    with OmnigateClient(sdk_stack.gateway.target) as client:
        started = time.monotonic()
        with pytest.raises(OmnigateClientError) as err:
            # 2000 text tokens take far longer than 0.3 s on the tiny model
            client.generate_all(
                _user("Tell me a story."),
                max_new_tokens=2000,
                min_new_tokens=2000,
                timeout_s=0.3,
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
        assert client.generate_all(_user("Hi"), max_new_tokens=2).text, "the stack still answers"


async def test_async_stream_result_and_concurrency(sdk_stack):
    async with AsyncOmnigateClient(sdk_stack.gateway.target, timeout_s=120) as client:
        assert await client.health() == "SERVING"
        info = await client.model_info()
        assert info.output_audio_sample_rate == 24000
        deltas = []
        stream = client.generate(_user("Hello, how are you?"), max_new_tokens=8)
        async for event in stream:
            if isinstance(event, TextDelta):
                deltas.append(event.text)
        # How many deltas depends on load: a busy worker merges the deltas already waiting into one message
        # (scheduler.Job.events), which a loaded CI machine made happen for all 8 tokens.
        assert deltas and all(deltas) and stream.attempts == 1
        results = await asyncio.gather(
            *(client.generate_all(_user("Hello, how are you?"), max_new_tokens=8) for _ in range(4))
        )
    for result in results:
        _check_text_result(result, 8)
        assert result.text == "".join(deltas), "greedy answers are the same, batched or not"


async def test_async_speech_error_and_deadline(sdk_stack):
    async with AsyncOmnigateClient(sdk_stack.gateway.target, timeout_s=120) as client:
        speech = await client.generate_all(_user("Say hello."), generation_mode="audio", max_new_tokens=4)
        assert speech.audio.sample_rate == 24000 and len(speech.audio.pcm) > 0
        with pytest.raises(OmnigateClientError) as err:
            await client.generate_all(
                _user("hi"), generation_mode="audio", speaker="Nobody", max_new_tokens=3
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Nobody" in err.value.message
        started = time.monotonic()
        with pytest.raises(OmnigateClientError) as err:
            await client.generate_all(
                _user("Tell me a story."),
                max_new_tokens=2000,
                min_new_tokens=2000,
                timeout_s=0.3,
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
