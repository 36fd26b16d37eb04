"""Bad requests get a clear message with the right status, and the services stay healthy afterwards."""

from __future__ import annotations

import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc
from tests.support import media_factory

pytestmark = pytest.mark.slow


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(*parts, mode=pb.GENERATION_MODE_TEXT, **kwargs) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role="user", content=list(parts))],
        parameters=pb.GenerationParameters(max_new_tokens=4),
        generation_mode=mode,
        **kwargs,
    )


def _text(text: str) -> pb.ContentPart:
    return pb.ContentPart(text=text)


def _inline(kind: str, data: bytes) -> pb.ContentPart:
    return pb.ContentPart(**{kind: pb.MediaSource(inline=pb.InlineMedia(data=data))})


def _url(kind: str, url: str) -> pb.ContentPart:
    return pb.ContentPart(**{kind: pb.MediaSource(url=url)})


CASES = {
    "empty conversation": (
        lambda: pb.GenerateRequest(generation_mode=pb.GENERATION_MODE_TEXT),
        grpc.StatusCode.INVALID_ARGUMENT,
        "conversation is empty",
    ),
    "unknown content type": (
        lambda: _request(pb.ContentPart(), _text("hi")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "no content type",
    ),
    "malformed audio": (
        lambda: _request(_inline("audio", b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk"), _text("hi")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "wav",
    ),
    "image given as audio": (
        lambda: _request(_inline("audio", media_factory.make_png()), _text("hi")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected audio",
    ),
    "unreachable url": (
        lambda: _request(_url("audio", f"http://127.0.0.1:{_closed_port()}/sound.wav"), _text("hi")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "127.0.0.1",
    ),
    "forbidden scheme": (
        lambda: _request(_url("image", "file:///etc/passwd"), _text("hi")),
        grpc.StatusCode.PERMISSION_DENIED,
        "file",
    ),
    "unset generation mode": (
        lambda: _request(_text("hi"), mode=pb.GENERATION_MODE_UNSPECIFIED),
        grpc.StatusCode.INVALID_ARGUMENT,
        "generation_mode is not set",
    ),
    "unknown generation mode": (
        lambda: _request(_text("hi"), mode=42),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown generation_mode 42",
    ),
    "output the model cannot make": (
        lambda: _request(_text("hi"), mode=pb.GENERATION_MODE_IMAGE),
        grpc.StatusCode.INVALID_ARGUMENT,
        "cannot generate image",
    ),
    "max_new_tokens over the limit": (
        lambda: pb.GenerateRequest(
            messages=[pb.Message(role="user", content=[_text("hi")])],
            parameters=pb.GenerationParameters(max_new_tokens=1_000_000),
            generation_mode=pb.GENERATION_MODE_TEXT,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_new_tokens is 1000000; it must be between 1 and",
    ),
    "unknown role": (
        lambda: pb.GenerateRequest(
            messages=[pb.Message(role="robot", content=[_text("hi")])],
            generation_mode=pb.GENERATION_MODE_TEXT,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "robot",
    ),
    "video without an audio track": (
        lambda: _request(
            _inline("video", media_factory.make_mp4(seconds=1.0, fps=5, w=32, h=32, with_audio=False)),
            _text("hi"),
            video=pb.VideoOptions(fps=1, load_audio_from_video=True),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "no audio track",
    ),
}


def _assert_healthy(stack) -> None:
    for service in (stack.gateway, stack.worker):
        with grpc.insecure_channel(service.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service.name


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_clear_status_and_services_stay_up(omni_stack, case):
    build, code, fragment = CASES[case]
    with grpc.insecure_channel(omni_stack.gateway.target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(build(), timeout=60))
        assert err.value.code() == code, err.value.details()
        assert fragment.lower() in err.value.details().lower()
        # The service still answers a good request.
        events = list(stub.Generate(_request(_text("hello")), timeout=60))
        assert events[-1].WhichOneof("event") == "summary"
    _assert_healthy(omni_stack)


def test_modality_the_model_cannot_take(janus_stack):
    with grpc.insecure_channel(janus_stack.gateway.target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(_request(_inline("audio", media_factory.make_wav()), _text("hi")), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot take audio input" in err.value.details()
    _assert_healthy(janus_stack)


def test_error_details_carry_google_rpc_status(omni_stack):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    with grpc.insecure_channel(omni_stack.gateway.target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(generation_mode=pb.GENERATION_MODE_TEXT), timeout=30))
    status = rpc_status.from_call(err.value)
    assert status is not None and status.message == err.value.details()
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == "omnigate.dev" and info.reason
