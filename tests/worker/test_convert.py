"""The worker's request stream: what the gateway sends is exactly what the worker rebuilds."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from omnigate.conversation import (
    ContentPart,
    GenerationMode,
    GenerationParams,
    GenerationRequest,
    Message,
    Modality,
)
from omnigate.errors import InvalidInput, LimitExceeded
from omnigate.grpc_server import Undecodable
from omnigate.media import Audio, Image, Video
from omnigate.validation import RequestLimits
from omnigate.worker.v1 import worker_pb2 as pb
from omnigate_gateway.convert import worker_stream
from omnigate_worker.convert import read_request


async def _aiter(items):
    for item in items:
        yield item


LIMITS = RequestLimits(max_messages=64, max_content_parts=64)


def _read(messages, limit=1 << 30, limits=LIMITS):
    return asyncio.run(read_request(_aiter(messages), limit, limits))


def _request() -> GenerationRequest:
    rng = np.random.default_rng(1)
    image = Image(rng.integers(0, 255, (7, 5, 3), dtype=np.uint8))
    audio = Audio(rng.standard_normal(1000).astype(np.float32), 16000)
    track = Audio(rng.standard_normal(3000).astype(np.float32), 16000)
    video = Video(
        rng.integers(0, 255, (3, 4, 6, 3), dtype=np.uint8), [0.0, 0.5, 1.0], 2.0, 25.0, 1.5, 37, track
    )
    return GenerationRequest(
        messages=[
            Message("system", [ContentPart(Modality.TEXT, text="Be brief.")]),
            Message(
                "user",
                [
                    ContentPart(Modality.IMAGE, image=image),
                    ContentPart(Modality.AUDIO, audio=audio),
                    ContentPart(Modality.VIDEO, video=video),
                    ContentPart(Modality.TEXT, text="What is this?"),
                ],
            ),
        ],
        params=GenerationParams(
            max_new_tokens=7, do_sample=True, temperature=0.5, top_k=3, seed=9, stop=["\n"]
        ),
        mode=GenerationMode.AUDIO,
        use_audio_in_video=True,
        speaker="Ethan",
        request_id="r1",
    )


def test_round_trip_with_small_chunks():
    sent = _request()
    got = _read(list(worker_stream(sent, chunk_bytes=16)))
    assert got.request_id == "r1" and got.mode is GenerationMode.AUDIO and got.speaker == "Ethan"
    assert got.params == sent.params
    assert got.use_audio_in_video
    assert [m.role for m in got.messages] == ["system", "user"]
    sent_parts, got_parts = sent.messages[1].content, got.messages[1].content
    np.testing.assert_array_equal(got_parts[0].image.pixels, sent_parts[0].image.pixels)
    np.testing.assert_array_equal(got_parts[1].audio.samples, sent_parts[1].audio.samples)
    assert got_parts[1].audio.sample_rate == 16000
    v_sent, v_got = sent_parts[2].video, got_parts[2].video
    np.testing.assert_array_equal(v_got.frames, v_sent.frames)
    np.testing.assert_array_equal(v_got.audio.samples, v_sent.audio.samples)
    assert (v_got.timestamps_s, v_got.sampled_fps, v_got.source_num_frames) == ([0.0, 0.5, 1.0], 2.0, 37)
    assert got_parts[3].text == "What is this?"


def test_stream_errors():
    messages = list(worker_stream(_request(), chunk_bytes=64))
    with pytest.raises(InvalidInput, match="before the spec"):
        _read(messages[1:])
    with pytest.raises(InvalidInput, match="two specs"):
        _read([messages[0], messages[0]])
    with pytest.raises(InvalidInput, match="declared"):
        _read(messages[:-1])
    with pytest.raises(InvalidInput, match="more bytes"):
        _read(messages + [messages[-1]])
    with pytest.raises(InvalidInput, match="undeclared"):
        _read([messages[0], pb.GenerateRequest(media_chunk=pb.MediaChunk(media_id=99, data=b"x"))])
    with pytest.raises(InvalidInput, match="without a spec"):
        _read([])
    with pytest.raises(LimitExceeded, match="limit is 10 bytes"):
        _read(messages, limit=10)


def test_unset_mode_is_refused():
    spec = pb.GenerateSpec(messages=[pb.Message(role="user", content=[pb.ContentPart(text="hi")])])
    with pytest.raises(InvalidInput, match="generation_mode"):
        _read([pb.GenerateRequest(spec=spec)])


def test_counts_are_checked_when_the_spec_arrives():
    spec = pb.GenerateSpec(
        messages=[pb.Message(role="user", content=[pb.ContentPart(text="a")])] * 3,
        generation_mode=pb.GENERATION_MODE_TEXT,
    )
    with pytest.raises(LimitExceeded, match="3 messages; the limit is 2"):
        _read([pb.GenerateRequest(spec=spec)], limits=RequestLimits(max_messages=2, max_content_parts=8))


def test_an_undecodable_stream_message_is_invalid_input():
    with pytest.raises(InvalidInput, match="not a valid"):
        _read([Undecodable("omnigate.worker.v1.GenerateRequest", ValueError("bad"))])
