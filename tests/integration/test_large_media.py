"""Decoded media far over gRPC's 4 MB default message size reaches the worker in chunks."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from omnigate.conversation import ContentPart, GenerationParams, GenerationRequest, Message, Modality
from omnigate.media import Audio, Video
from omnigate.worker.v1 import worker_pb2_grpc
from omnigate_gateway.convert import worker_stream

pytestmark = pytest.mark.slow


def _sixty_second_video_at_two_fps() -> Video:
    frames = np.random.default_rng(0).integers(0, 255, size=(120, 224, 224, 3), dtype=np.uint8)
    track = Audio((0.1 * np.sin(np.arange(60 * 16000) * 0.05)).astype(np.float32), 16000)
    return Video(frames, [i / 2 for i in range(120)], 2.0, 30.0, 60.0, 1800, audio=track)


def test_sixty_second_video_at_fps_2_reaches_the_worker(omni_stack):
    video = _sixty_second_video_at_two_fps()
    assert video.frames.nbytes > 4 * 1024 * 1024 * 4  # 18 MB of frames, plus 3.8 MB of audio
    request = GenerationRequest(
        messages=[
            Message(
                "user",
                [ContentPart(Modality.VIDEO, video=video), ContentPart(Modality.TEXT, text="Describe.")],
            )
        ],
        params=GenerationParams(max_new_tokens=2),
        use_audio_in_video=True,
    )
    messages = list(worker_stream(request, chunk_bytes=1024 * 1024))
    assert max(m.ByteSize() for m in messages) < 4 * 1024 * 1024
    with grpc.insecure_channel(omni_stack.worker.target) as channel:  # default client limits
        events = list(worker_pb2_grpc.WorkerServiceStub(channel).Generate(iter(messages), timeout=300))
    summary = events[-1].summary
    assert summary.output_tokens >= 1
    assert summary.prompt_tokens > 1000  # 60 s of audio and 120 frames became prompt tokens


def test_declared_sizes_are_enforced(omni_stack):
    video = _sixty_second_video_at_two_fps()
    request = GenerationRequest(
        messages=[Message("user", [ContentPart(Modality.VIDEO, video=video)])],
        params=GenerationParams(max_new_tokens=2),
    )
    messages = list(worker_stream(request, chunk_bytes=1024 * 1024))
    truncated = messages[:-1]  # the last chunk never arrives
    with grpc.insecure_channel(omni_stack.worker.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(worker_pb2_grpc.WorkerServiceStub(channel).Generate(iter(truncated), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "declared" in err.value.details()
