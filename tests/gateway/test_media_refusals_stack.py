"""Media the model cannot take, against the real tiny Qwen2.5-Omni worker: refused with 400 /
INVALID_ARGUMENT and a clear message, over HTTP, over gRPC and straight at the worker, while the worker
stays SERVING and keeps answering good requests (these used to fail with INTERNAL / 500 and eject it)."""

from __future__ import annotations

import base64
import io

import grpc
import httpx
import numpy as np
import pytest
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnigate.conversation import ContentPart, GenerationParams, GenerationRequest, Message, Modality
from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc
from omnigate.media import Audio, Image
from omnigate.worker.v1 import worker_pb2_grpc
from omnigate_gateway.convert import worker_stream
from tests.support import media_factory as mf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gateway(omni_worker, gateway_factory):
    return gateway_factory(omni_worker.target)


def _wav(samples: int, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.full((samples, 1), 0.25, np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _chat(gateway, part: dict) -> httpx.Response:
    base = f"http://127.0.0.1:{gateway.http_port}/v1"
    model = httpx.get(f"{base}/models", timeout=30).json()["data"][0]["id"]
    body = {
        "model": model,
        "max_tokens": 2,
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}],
    }
    return httpx.post(f"{base}/chat/completions", json=body, timeout=120)


def _serving(service) -> bool:
    with grpc.insecure_channel(service.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _image(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(data)}}


def _audio(data: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": _b64(data), "format": "wav"}}


@pytest.mark.parametrize(
    ("part", "message"),
    [
        (_image(mf.make_png(400, 1)), "the image is 400x1 pixels (aspect ratio 400:1); the limit is 200:1"),
        (_image(mf.make_png(1, 300)), "the image is 1x300 pixels (aspect ratio 300:1); the limit is 200:1"),
        (_audio(_wav(1, 8000)), "the audio is 0.125 ms long (1 sample at 8000 Hz); the minimum is 0.1 s"),
        (
            _audio(_wav(3, 192000)),
            "the audio is 0.0156 ms long (3 samples at 192000 Hz); the minimum is 0.1 s",
        ),
    ],
    ids=["png-400x1", "png-1x300", "wav-1-sample-8k", "wav-3-samples-192k"],
)
def test_http_refuses_media_the_model_cannot_take(gateway, omni_worker, part, message):
    reply = _chat(gateway, part)
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["error"]["message"]
    assert _serving(gateway) and _serving(omni_worker)


def test_grpc_refuses_a_too_long_strip_and_a_good_image_still_works(gateway):
    def generate(png: bytes):
        request = pb.GenerateRequest(
            messages=[
                pb.Message(
                    role="user",
                    content=[
                        pb.ContentPart(image=pb.MediaSource(inline=pb.InlineMedia(data=png))),
                        pb.ContentPart(text="What is this?"),
                    ],
                )
            ],
            parameters=pb.GenerationParameters(max_new_tokens=2),
            generation_mode=pb.GENERATION_MODE_TEXT,
        )
        with grpc.insecure_channel(gateway.target) as channel:
            return list(gateway_pb2_grpc.GatewayServiceStub(channel).Generate(request, timeout=120))

    for _ in range(5):  # repeated: a client mistake never takes the worker out
        with pytest.raises(grpc.RpcError) as info:
            generate(mf.make_png(1000, 3))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "aspect ratio 333.3:1" in info.value.details()
    assert generate(mf.make_png(200, 1))[-1].WhichOneof("event") == "summary"  # 200:1 is taken
    assert _serving(gateway)


@pytest.mark.parametrize(
    ("part", "fragment"),
    [
        (ContentPart(Modality.IMAGE, image=Image(np.zeros((1, 400, 3), np.uint8))), "absolute aspect ratio"),
        (ContentPart(Modality.AUDIO, audio=Audio(np.zeros(2, np.float32), 16000)), "the minimum is 0.1 s"),
        (ContentPart(Modality.AUDIO, audio=Audio(np.zeros(0, np.float32), 16000)), "the minimum is 0.1 s"),
    ],
    ids=["image-400x1", "audio-2-samples", "audio-empty"],
)
def test_worker_refuses_what_its_processor_cannot_take(omni_worker, part, fragment):
    """Straight at the worker (as a gateway with other limits would send it): INVALID_ARGUMENT."""
    request = GenerationRequest(
        messages=[Message("user", [part, ContentPart(Modality.TEXT, text="What is this?")])],
        params=GenerationParams(max_new_tokens=2),
        request_id="direct",
    )
    with grpc.insecure_channel(omni_worker.target) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(iter(list(worker_stream(request, 1024 * 1024))), timeout=120))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert fragment in info.value.details()
    assert _serving(omni_worker)
