"""No request can take a worker out: against the real stack (gateway + worker processes, the tiny Omni
model), bad input of every kind gets a clear INVALID_ARGUMENT / RESOURCE_EXHAUSTED (HTTP 4xx) with a short
message, never INTERNAL/UNKNOWN (500), and a good client keeps being served, with the gateway SERVING and
its worker never ejected, while many bad clients hammer it."""

from __future__ import annotations

import base64
import io
import json
import math
import struct
import threading
import time

import grpc
import httpx
import numpy as np
import PIL.Image
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc
from tests.support.stack import metric_sum, scrape_metrics

pytestmark = pytest.mark.slow

GENERATE = "/omnigate.gateway.v1.GatewayService/Generate"
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
MAX_MESSAGE = 6 * 1024 * 1024 * 1024  # the client side of these tests sends what it likes


@pytest.fixture(scope="module")
def channel(omni_stack):
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(omni_stack.gateway.target, options=options) as channel:
        yield channel


def _text(text: str) -> pb.ContentPart:
    return pb.ContentPart(text=text)


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    PIL.Image.fromarray(np.full((height, width, 3), 200, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _wav(samples: int, rate: int) -> bytes:
    data = struct.pack(f"<{samples}h", *([1000] * samples))
    header = (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    )
    return header + b"data" + struct.pack("<I", len(data)) + data


def _request(
    *parts: pb.ContentPart, role: str = "user", mode=pb.GENERATION_MODE_TEXT, **params
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role=role, content=list(parts) or [_text("hi")])],
        parameters=pb.GenerationParameters(max_new_tokens=params.pop("max_new_tokens", 2), **params),
        generation_mode=mode,
    )


def _call(channel, data: bytes | pb.GenerateRequest, timeout: float = 60) -> tuple[grpc.StatusCode, str]:
    raw = data if isinstance(data, bytes) else data.SerializeToString()
    method = channel.unary_stream(
        GENERATE, request_serializer=lambda b: b, response_deserializer=pb.GenerateResponse.FromString
    )
    try:
        for _ in method(raw, timeout=timeout):
            pass
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _inline(kind: str, data: bytes) -> pb.ContentPart:
    return pb.ContentPart(**{kind: pb.MediaSource(inline=pb.InlineMedia(data=data))})


CASES = {
    "negative temperature": (_request(do_sample=True, temperature=-1.0), "temperature"),
    "NaN temperature": (_request(do_sample=True, temperature=math.nan), "temperature"),
    "denormal temperature": (_request(do_sample=True, temperature=1e-45), "temperature"),
    "tiny temperature (NaN probabilities)": (_request(do_sample=True, temperature=1e-30), "temperature"),
    "zero repetition_penalty": (_request(repetition_penalty=0.0), "repetition_penalty"),
    "negative repetition_penalty": (_request(repetition_penalty=-2.0), "repetition_penalty"),
    "NaN repetition_penalty": (_request(repetition_penalty=math.nan), "repetition_penalty"),
    "top_p above 1": (_request(do_sample=True, top_p=1.5), "top_p"),
    "top_k beyond 31 bits": (_request(do_sample=True, top_k=2**32 - 1), "top_k"),
    "max_new_tokens over the limit": (_request(max_new_tokens=2**32 - 1), "max_new_tokens"),
    "min_new_tokens over max": (_request(max_new_tokens=2, min_new_tokens=2**32 - 1), "min_new_tokens"),
    "1 MB role": (_request(role="r" * 1_000_000), "role"),
    "empty stop string": (_request(stop=[""]), "stop"),
    "100 KB speaker": (
        pb.GenerateRequest(
            messages=[pb.Message(role="user", content=[_text("hi")])],
            parameters=pb.GenerationParameters(max_new_tokens=2),
            generation_mode=pb.GENERATION_MODE_AUDIO,
            speaker="v" * 100_000,
        ),
        "speaker",
    ),
    "5 MB text part": (_request(_text("word " * 1_000_000)), "prompt is at least"),
    "100k messages": (
        pb.GenerateRequest(
            messages=[pb.Message(role="user", content=[_text("a")])] * 100_000,
            parameters=pb.GenerationParameters(max_new_tokens=2),
            generation_mode=pb.GENERATION_MODE_TEXT,
        ),
        "messages; the limit is",
    ),
    "100k parts": (_request(*[_text("a")] * 100_000), "content parts; the limit is"),
    "undecodable protobuf": (b"\x0a\xff\xff\xff\xff\x0f", "not a valid omnigate.gateway.v1.GenerateRequest"),
    "invalid UTF-8 in a string field": (
        # messages[0].role = b"\xff\xfe" (field 1 of field 1)
        b"\x0a\x04\x0a\x02\xff\xfe"
        + pb.GenerateRequest(generation_mode=pb.GENERATION_MODE_TEXT).SerializeToString(),
        "UTF-8",
    ),
    "400x1 image": (_request(_inline("image", _png(400, 1)), _text("hi")), "image"),
    "1x300 image": (_request(_inline("image", _png(1, 300)), _text("hi")), "image"),
    "1-sample audio at 192 kHz": (_request(_inline("audio", _wav(1, 192000)), _text("hi")), "audio"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_a_clear_client_error(channel, case):
    request, expected = CASES[case]
    code, message = _call(channel, request)
    assert code in CLIENT_ERRORS, (code, message)
    assert expected in message
    assert len(message) < 600, message  # never the oversized input repeated


def test_a_long_prompt_is_refused_before_it_is_tokenized(channel):
    """An 8 MB text (over the worker's old 8 MiB message limit, and the gateway channel's old 4 MiB) reaches
    the worker and is refused by the prompt-token budget from its length alone ("at least N tokens")."""
    code, message = _call(channel, _request(_text("x" * 8_000_000)))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, message)
    assert "the prompt is at least" in message and "8000000 characters of text" in message


def _health(channel) -> int:
    return (
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    )


def _http_bad(base: str, model: str) -> httpx.Response:
    png = base64.b64encode(_png(400, 1)).decode()
    body = {
        "model": model,
        "max_tokens": 2,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                    {"type": "text", "text": "hi"},
                ],
            }
        ],
    }
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)


def test_bad_clients_cannot_take_the_worker_out(omni_stack, channel):
    """Six clients send bad requests (gRPC and HTTP) for a while; a good client is served all along, the
    gateway and the worker stay SERVING at every check, and the worker is never ejected."""
    stop = threading.Event()
    bad_codes: list[object] = []
    base = f"http://127.0.0.1:{omni_stack.gateway.http_port}"
    model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
    bad_requests = [
        CASES[name][0]
        for name in (
            "negative temperature",
            "NaN temperature",
            "zero repetition_penalty",
            "400x1 image",
            "1-sample audio at 192 kHz",
            "undecodable protobuf",
        )
    ]

    def bad_grpc(offset: int) -> None:
        i = offset
        while not stop.is_set():
            bad_codes.append(_call(channel, bad_requests[i % len(bad_requests)])[0])
            i += 1

    def bad_http() -> None:
        while not stop.is_set():
            bad_codes.append(_http_bad(base, model).status_code)

    threads = [threading.Thread(target=bad_grpc, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=bad_http) for _ in range(2)]
    for t in threads:
        t.start()
    good, health = [], []
    worker_channel = grpc.insecure_channel(omni_stack.worker.target)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            good.append(_call(channel, _request(_text("Hello")), timeout=30))
            health.append(_health(channel))
            health.append(_health(worker_channel))
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        worker_channel.close()
    assert len(bad_codes) >= 30
    assert all(code in CLIENT_ERRORS or code == 400 for code in bad_codes), set(map(str, bad_codes))
    assert good and all(code is grpc.StatusCode.OK for code, _ in good), good
    assert all(status == health_pb2.HealthCheckResponse.SERVING for status in health)
    samples = scrape_metrics(omni_stack.gateway)
    assert metric_sum(samples, "omnigate_gateway_workers", state="ejected") == 0
    assert metric_sum(samples, "omnigate_gateway_workers", state="ready") == 1


floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, 1e-45, 1e-38, 1e-5, 1.0, 2.0, 3.4e38]),
)
uint32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 2**31, 2**32 - 1]))
media = st.one_of(
    st.binary(max_size=64).map(lambda b: ("image", b)),
    st.binary(max_size=64).map(lambda b: ("audio", b)),
    st.binary(max_size=64).map(lambda b: ("video", b)),
    st.tuples(st.integers(1, 600), st.integers(1, 600)).map(lambda wh: ("image", _png(*wh))),
    st.tuples(st.integers(1, 64), st.sampled_from([4000, 8000, 192000])).map(lambda sr: ("audio", _wav(*sr))),
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    temperature=st.none() | floats,
    top_p=st.none() | floats,
    top_k=st.none() | uint32,
    repetition_penalty=st.none() | floats,
    max_new_tokens=st.sampled_from([0, 1, 2, 3, 2**32 - 1]),
    min_new_tokens=st.sampled_from([0, 1, 3, 2**31]),
    do_sample=st.booleans(),
    item=st.none() | media,
    text=st.text(max_size=20),
)
def test_random_parameters_and_media_never_fail_internally(
    channel,
    temperature,
    top_p,
    top_k,
    repetition_penalty,
    max_new_tokens,
    min_new_tokens,
    do_sample,
    item,
    text,
):
    params = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min_new_tokens,
        "do_sample": do_sample,
        **{
            name: value
            for name, value in (
                ("temperature", temperature),
                ("top_p", top_p),
                ("top_k", top_k),
                ("repetition_penalty", repetition_penalty),
            )
            if value is not None
        },
    }
    parts = [_inline(*item)] if item is not None else []
    code, message = _call(channel, _request(*parts, _text(text or "hi"), **params))
    assert code in CLIENT_ERRORS | {grpc.StatusCode.OK}, (code, message)


def test_a_refused_grpc_request_has_an_access_line_saying_why(omni_stack, channel):
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        list(
            stub.Generate(
                _request(do_sample=True, temperature=-1.0), metadata=[("x-request-id", "hostile-why-1")]
            )
        )
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        lines = [
            json.loads(line)
            for line in omni_stack.gateway.log_path.read_text(errors="replace").splitlines()
            if '"hostile-why-1"' in line and "omnigate_gateway.access" in line
        ]
        if lines:
            break
        time.sleep(0.2)
    assert len(lines) == 1 and lines[0]["code"] == "INVALID_ARGUMENT", lines
    assert lines[0]["reason"].startswith("temperature is -1.0; it must be 0 (greedy) or between")


json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, -1, 0.0, 1e-45, 1e308, 2**31, 2**32, 2**63, 2**64]),
    st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3),
)
http_media = st.one_of(
    st.binary(max_size=48).map(lambda b: ("image_url", "image/png", b)),
    st.binary(max_size=48).map(lambda b: ("input_audio", "wav", b)),
    st.tuples(st.integers(1, 500), st.integers(1, 500)).map(lambda wh: ("image_url", "image/png", _png(*wh))),
    st.tuples(st.integers(1, 64), st.sampled_from([8000, 192000])).map(
        lambda sr: ("input_audio", "wav", _wav(*sr))
    ),
)
HTTP_PARAMS = (
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "stop",
    "n",
    "ignore_eos",
)


def _http_part(item) -> dict:
    kind, fmt, data = item
    encoded = base64.b64encode(data).decode()
    if kind == "image_url":
        return {"type": "image_url", "image_url": {"url": f"data:{fmt};base64,{encoded}"}}
    return {"type": "input_audio", "input_audio": {"data": encoded, "format": fmt}}


@pytest.fixture(scope="module")
def http_client(omni_stack):
    with httpx.Client(base_url=f"http://127.0.0.1:{omni_stack.gateway.http_port}", timeout=60) as client:
        yield client


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    params=st.dictionaries(st.sampled_from(HTTP_PARAMS), json_values, max_size=4), item=st.none() | http_media
)
def test_random_http_parameters_and_media_never_get_a_500(http_client, params, item):
    content = [{"type": "text", "text": "hi"}] + ([_http_part(item)] if item is not None else [])
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **params}
    response = http_client.post("/v1/chat/completions", json=body)
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {
            "messages": [{"role": "user", "content": "hi"}],
            "modalities": ["text", "audio"],
            "audio": {"voice": "v" * 100_000, "format": "wav"},
        },
        {"messages": [{"role": "r" * 1_000_000, "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}], "stop": ["s" * 1_000_000]},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "http://" + "h" * 65_536 + "/a.png"}}
                    ],
                }
            ]
        },
    ],
    ids=["100 KB voice", "1 MB role", "1 MB stop string", "64 KB host"],
)
def test_http_refusals_never_repeat_oversized_input(http_client, body):
    response = http_client.post("/v1/chat/completions", json={"max_tokens": 2, **body})
    assert 400 <= response.status_code < 500, response.text[:300]
    assert len(response.content) < 2000, response.text[:300]
    assert response.json()["error"]["message"]
