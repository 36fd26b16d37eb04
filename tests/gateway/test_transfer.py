"""Media travels to the worker bounded by what the model's processor keeps of it, and nothing else changes.

With the fake worker we look at exactly what the gateway sends; with the real worker (tiny Qwen2.5-Omni,
whose processor keeps at most 50176 pixels of an image and 12544 of a video frame) we check that the
model's answer is the same as when the worker gets the decoded media directly, untouched by the gateway.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from omnigate.conversation import ContentPart, GenerationParams, GenerationRequest, Message, Modality
from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc
from omnigate.media import DecodeLimits, Image
from omnigate.worker.v1 import worker_pb2_grpc
from omnigate_gateway.convert import worker_stream
from omnigate_gateway.media.image import decode_image
from omnigate_gateway.media.resize import fit_size
from omnigate_gateway.media.video import decode_video
from tests.support import media_factory as mf

from .conftest import FAKE_MAX_IMAGE_PIXELS, FAKE_MAX_VIDEO_FRAME_PIXELS

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 8
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def fake_gateway(fake_worker, gateway_factory):
    return gateway_factory(fake_worker[1])


@pytest.fixture(scope="module")
def real_gateway(omni_worker, gateway_factory):
    return gateway_factory(omni_worker.target)


def _via_gateway(gateway, kind: str, data: bytes, **video) -> tuple[str, int]:
    request = pb.GenerateRequest(
        messages=[
            pb.Message(
                role="user",
                content=[
                    pb.ContentPart(**{kind: pb.MediaSource(inline=pb.InlineMedia(data=data))}),
                    pb.ContentPart(text=QUESTION),
                ],
            )
        ],
        parameters=pb.GenerationParameters(max_new_tokens=MAX_NEW_TOKENS),
        generation_mode=pb.GENERATION_MODE_TEXT,
        video=pb.VideoOptions(**video) if video else None,
    )
    with grpc.insecure_channel(gateway.target) as channel:
        events = list(gateway_pb2_grpc.GatewayServiceStub(channel).Generate(request, timeout=300))
    text = "".join(e.text.text for e in events if e.WhichOneof("event") == "text")
    return text, events[-1].summary.prompt_tokens


def _direct_to_worker(worker, part: ContentPart, fps: float | None = None) -> tuple[str, int]:
    """The decoded media straight to the worker, bypassing the gateway (and its resizing)."""
    request = GenerationRequest(
        messages=[Message("user", [part, ContentPart(Modality.TEXT, text=QUESTION)])],
        params=GenerationParams(max_new_tokens=MAX_NEW_TOKENS),
        video_fps=fps,
        request_id="direct",
    )
    with grpc.insecure_channel(worker.target) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        events = list(stub.Generate(iter(list(worker_stream(request, 1024 * 1024))), timeout=300))
    text = "".join(e.text.text for e in events if e.WhichOneof("event") == "text")
    return text, events[-1].summary.prompt_tokens


# ------------------------------------------------------------------------------ what the worker receives


def test_image_within_bounds_reaches_the_worker_byte_for_byte(fake_gateway, fake_worker):
    data = mf.make_png(200, 150)  # 30000 pixels: within the bound
    _via_gateway(fake_gateway, "image", data)
    assert np.array_equal(fake_worker[0].last_image(), decode_image(data, DecodeLimits()).pixels)


def test_4k_image_reaches_the_worker_downscaled(fake_gateway, fake_worker):
    _via_gateway(fake_gateway, "image", mf.make_jpeg(3840, 2160))
    received = fake_worker[0].last_image()
    assert received.shape == (168, 298, 3)
    assert received.shape[0] * received.shape[1] <= FAKE_MAX_IMAGE_PIXELS
    assert fit_size(3840, 2160, FAKE_MAX_IMAGE_PIXELS) == (298, 168)


def test_1080p_video_frames_reach_the_worker_downscaled(fake_gateway, fake_worker):
    data = mf.make_video("mp4", "h264", seconds=2.0, fps=5, w=1920, h=1080, with_audio=False)
    _via_gateway(fake_gateway, "video", data, fps=2.0)
    (ref,) = [p.video for p in fake_worker[0].last_parts() if p.WhichOneof("part") == "video"]
    assert (ref.width, ref.height, ref.num_frames) == (149, 84, 4)
    assert ref.width * ref.height <= FAKE_MAX_VIDEO_FRAME_PIXELS
    assert len(fake_worker[0].media[-1][ref.media_id]) == 4 * 84 * 149 * 3  # 150 KB instead of 25 MB


# --------------------------------------------------------------------------------- the model's answer


def test_answer_unchanged_for_an_image_within_bounds(real_gateway, omni_worker):
    data = mf.make_jpeg(160, 120)
    pixels = decode_image(data, DecodeLimits()).pixels
    expected = _direct_to_worker(omni_worker, ContentPart(Modality.IMAGE, image=Image(pixels)))
    assert expected[0]
    assert _via_gateway(real_gateway, "image", data) == expected


def test_answer_unchanged_for_a_video_within_bounds(real_gateway, omni_worker):
    data = mf.make_video("mp4", "h264", seconds=2.0, fps=10, w=96, h=64, with_audio=False)
    video = decode_video(data, 2.0, False, 16000, DecodeLimits())
    expected = _direct_to_worker(omni_worker, ContentPart(Modality.VIDEO, video=video), fps=2.0)
    assert expected[0]
    assert _via_gateway(real_gateway, "video", data, fps=2.0) == expected


def test_4k_image_costs_the_model_the_same_prompt_tokens(real_gateway, omni_worker):
    """The processor shrinks a 4K image to its bound anyway: sending it pre-shrunk changes nothing in the
    prompt (same patch grid, same number of image tokens)."""
    data = mf.make_jpeg(3840, 2160)
    raw = decode_image(data, DecodeLimits()).pixels
    assert raw.shape == (2160, 3840, 3)
    _, raw_tokens = _direct_to_worker(omni_worker, ContentPart(Modality.IMAGE, image=Image(raw)))
    _, gateway_tokens = _via_gateway(real_gateway, "image", data)
    assert gateway_tokens == raw_tokens


def test_1080p_video_costs_the_model_the_same_prompt_tokens(real_gateway, omni_worker):
    data = mf.make_video("mp4", "h264", seconds=2.0, fps=5, w=1920, h=1080, with_audio=False)
    raw = decode_video(data, 2.0, False, 16000, DecodeLimits())
    assert raw.frames.shape == (4, 1080, 1920, 3)
    _, raw_tokens = _direct_to_worker(omni_worker, ContentPart(Modality.VIDEO, video=raw), fps=2.0)
    _, gateway_tokens = _via_gateway(real_gateway, "video", data, fps=2.0)
    assert gateway_tokens == raw_tokens
