"""Unit tests of the SDK's result types, request building and retry policy (no server)."""

from __future__ import annotations

import io
import random
import wave

import grpc
import numpy as np
import pytest

from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate_client import (
    AudioChunk,
    GeneratedAudio,
    GenerationResult,
    OmnigateClientError,
    RetryPolicy,
    Summary,
    TextDelta,
    Timings,
)
from omnigate_client.protocol import build_request, event_from_proto


def test_generated_audio_joins_chunks_in_sequence_order():
    left = np.arange(0, 8, dtype="<i2")
    right = np.arange(100, 108, dtype="<i2")
    stereo = [
        AudioChunk(np.stack([left[4:], right[4:]], 1).tobytes(), 16000, 2, 1),
        AudioChunk(np.stack([left[:4], right[:4]], 1).tobytes(), 16000, 2, 0),
    ]
    audio = GeneratedAudio(stereo)
    assert [c.sequence for c in audio] == [0, 1] and len(audio) == 2 and audio
    assert audio.pcm.shape == (8, 2) and audio.pcm[:, 0].tolist() == left.tolist()
    assert audio.seconds == pytest.approx(8 / 16000)
    assert audio.samples.dtype == np.float32 and audio.samples.max() < 1
    with wave.open(io.BytesIO(audio.to_wav())) as w:
        assert (w.getnchannels(), w.getframerate(), w.getnframes()) == (2, 16000, 8)
    assert not GeneratedAudio() and GeneratedAudio().seconds == 0
    with pytest.raises(ValueError, match="no audio"):
        GeneratedAudio().to_wav()


def test_result_from_events_and_summary_fields():
    summary = Summary("length", 10, 2, 0.0, "m", Timings(total_s=1.5))
    result = GenerationResult.from_events([TextDelta("a"), TextDelta("b"), summary], "rid")
    assert result.text == "ab" and result.finish_reason == "length" and result.request_id == "rid"
    assert result.usage.total_tokens == 12 and result.timings["total_s"] == 1.5 and result.model_id == "m"
    with pytest.raises(KeyError):
        result.timings["nope"]
    empty = GenerationResult()
    assert empty.finish_reason is None and empty.usage.total_tokens == 0


def test_request_building_and_bad_input():
    request = build_request(
        [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "url": "https://example.com/a.png"},
                    {"type": "audio", "data": b"RIFF", "mime_type": "audio/wav"},
                    {"type": "text", "text": "hi"},
                ],
            },
        ],
        generation_mode="audio",
        max_new_tokens=5,
        temperature=0.5,
        stop="END",
        fps=1,
    )
    assert request.generation_mode == pb.GENERATION_MODE_AUDIO and request.parameters.stop == ["END"]
    assert request.parameters.HasField("temperature") and not request.parameters.HasField("top_p")
    parts = request.messages[1].content
    assert parts[0].image.url == "https://example.com/a.png" and parts[1].audio.inline.data == b"RIFF"
    with pytest.raises(ValueError, match="generation_mode"):
        build_request([], generation_mode="video")
    with pytest.raises(ValueError, match="unknown content part"):
        build_request([{"role": "user", "content": [{"type": "smell"}]}])
    with pytest.raises(OSError):
        build_request([{"role": "user", "content": [{"type": "audio", "path": "/no/such.wav"}]}])


def test_event_conversion():
    event = event_from_proto(
        pb.GenerateResponse(audio=pb.AudioChunk(pcm=b"\0\0", sample_rate=24000, sequence=3))
    )
    assert event == AudioChunk(b"\0\0", 24000, 1, 3)


def _error(code, retry_after=None):
    return OmnigateClientError(code, "x", retry_after=retry_after)


def test_retry_policy_decisions_backoff_and_jitter():
    policy = RetryPolicy(max_retries=3, initial_backoff_s=0.2, max_backoff_s=0.5, jitter=0.5)
    rng = random.Random(0)
    waits = [policy.delay(_error(grpc.StatusCode.UNAVAILABLE), n, rng) for n in (1, 2, 3)]
    assert 0.1 <= waits[0] <= 0.2 and 0.2 <= waits[1] <= 0.4 and 0.25 <= waits[2] <= 0.5  # capped at 0.5
    assert policy.delay(_error(grpc.StatusCode.UNAVAILABLE), 4) is None  # bounded
    assert policy.delay(_error(grpc.StatusCode.RESOURCE_EXHAUSTED), 1) is None  # no RetryInfo
    honoured = policy.delay(_error(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after=2.0), 1)
    assert 2.0 <= honoured <= 2.1
    assert policy.delay(_error(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after=3600), 1) is None
    for code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
    ):
        assert policy.delay(_error(code, retry_after=1.0), 1) is None
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def test_error_text_names_code_delay_and_request_id():
    error = OmnigateClientError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", retry_after=1.5, request_id="r1"
    )
    assert str(error) == "RESOURCE_EXHAUSTED: queue full (retry after 1.5 s) [request id r1]"
    assert error.status_name == "RESOURCE_EXHAUSTED" and error.details() == "queue full"
