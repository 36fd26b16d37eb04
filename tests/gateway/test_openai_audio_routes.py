"""``POST /v1/audio/speech`` and ``POST /v1/audio/transcriptions`` (``openai_api/routes/audio.py``) on their
own: the real ASGI app over a real ``GatewayCore`` (real auth, media decoding and metrics), driven in-process
through httpx's ASGI transport, with a fake worker pool named as one (tests/support/fake_workers.py). The
same routes over real sockets and a real worker, with the official ``openai`` SDK, are tested in
tests/integration/test_openai_audio.py."""

from __future__ import annotations

import asyncio
import io
import json
import wave

import av
import grpc
import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from omnigate.worker.v1 import worker_pb2 as wk
from omnigate_gateway.openai_api.app import create_app
from omnigate_gateway.settings import GatewaySettings
from tests.support import media_factory
from tests.support.certs import secret_volume
from tests.support.fake_workers import (
    SPEAKING_MODEL,
    TEXT_MODEL,
    FakeWorkerPool,
    core_over,
    rpc_error,
    summary,
    text,
)

RATE = 24000


async def _healthy() -> bool:
    return True


def _tone(seconds: float) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes()


def _audio(pcm: bytes, sequence: int) -> wk.GenerateResponse:
    return wk.GenerateResponse(audio=wk.AudioChunk(pcm_s16le=pcm, sample_rate=RATE, sequence=sequence))


PCM = [_tone(0.4), _tone(0.4), _tone(0.4)]
SPOKEN = [text("Hel"), text("lo"), *(_audio(p, i) for i, p in enumerate(PCM)), summary(2)]


@pytest.fixture
def pool() -> FakeWorkerPool:
    return FakeWorkerPool(info=SPEAKING_MODEL, events=list(SPOKEN))


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def _client(pool, registry, settings: GatewaySettings | None = None) -> httpx.AsyncClient:
    settings = settings or GatewaySettings()
    app = create_app(core_over(pool, registry, settings), settings, _healthy)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test")


@pytest.fixture
async def client(pool, registry):
    async with _client(pool, registry) as client:
        yield client


def _speech(**fields) -> dict:
    return {"model": "omni", "input": "Hello.", "voice": "ethan", **fields}


def _generate_count(registry, code: str, mode: str) -> float:
    labels = {"rpc": "Generate", "code": code, "mode": mode}
    return registry.get_sample_value("omnigate_gateway_requests_total", labels) or 0.0


async def test_speech_streams_a_wav_of_the_workers_audio_without_a_length(client, pool):
    async with client.stream("POST", "/v1/audio/speech", json=_speech(response_format="wav")) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"] == "audio/wav"
        assert "content-length" not in response.headers, "chunked: the length is not known up front"
        body = await response.aread()  # httpx's ASGI transport hands the body over whole: pieces are not seen
    with wave.open(io.BytesIO(body)) as w:
        assert (w.getframerate(), w.getnchannels()) == (RATE, 1)
        assert w.readframes(10**6) == b"".join(PCM)
    sent = pool.calls[0][0]
    assert sent.mode.value == "audio" and sent.speaker == "Ethan"
    assert "Hello." in sent.messages[0].content[0].text


async def test_speech_in_pcm_and_mp3(client):
    pcm = await client.post("/v1/audio/speech", json=_speech(response_format="pcm"))
    assert pcm.status_code == 200 and pcm.headers["content-type"] == "audio/pcm"
    assert pcm.content == b"".join(PCM)
    mp3 = await client.post("/v1/audio/speech", json=_speech())  # OpenAI's default format
    assert mp3.status_code == 200 and mp3.headers["content-type"] == "audio/mpeg"
    with av.open(io.BytesIO(mp3.content)) as container:
        samples = sum(frame.samples for frame in container.decode(audio=0))
    assert samples >= 1.1 * RATE


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"voice": "alloy"}, "voice"),
        ({"response_format": "ogg"}, "response_format"),
        ({"speed": 2}, "speed"),
        ({"input": ""}, "input"),
        ({"colour": "blue"}, "colour"),
    ],
)
async def test_a_bad_speech_request_is_400_naming_the_parameter_and_never_reaches_a_worker(
    client, pool, registry, fields, param
):
    response = await client.post("/v1/audio/speech", json=_speech(**fields))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert not pool.calls
    assert _generate_count(registry, "INVALID_ARGUMENT", "unknown") == 1, "counted as a refused Generate"


async def test_speech_from_a_model_that_does_not_speak_is_400(client, pool):
    pool.info = TEXT_MODEL
    response = await client.post("/v1/audio/speech", json=_speech(model="text-model"))
    assert response.status_code == 400
    assert "cannot generate speech" in response.json()["error"]["message"] and not pool.calls


async def test_a_failure_before_the_first_audio_has_its_http_status(client, pool):
    pool.events = [text("Hi"), rpc_error(grpc.StatusCode.UNAVAILABLE, "socket closed")]
    response = await client.post("/v1/audio/speech", json=_speech(response_format="wav"))
    assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable_error"


async def test_a_failure_after_the_first_audio_cuts_the_answer_short(pool, registry):
    """The app is called as ASGI directly, to see exactly what it sends: the status line and the first
    audio, then nothing more: no last (empty) chunk, so the server closes the connection and the client
    reads an incomplete body."""
    pool.events = [_audio(PCM[0], 0), rpc_error(grpc.StatusCode.INTERNAL, "talker crashed")]
    settings = GatewaySettings()
    app = create_app(core_over(pool, registry, settings), settings, _healthy)
    body = json.dumps(_speech(response_format="pcm")).encode()
    requests = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client stays: no disconnect
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/audio/speech",
        "raw_path": b"/v1/audio/speech",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert b"".join(m["body"] for m in bodies) == PCM[0]
    assert all(m.get("more_body") for m in bodies), "the body never ends: the transfer is cut short"
    assert pool.started[0].cancelled
    assert _generate_count(registry, "INTERNAL", "audio") == 1, "the core's access line and count name it"


async def test_speech_ends_as_a_valid_file_when_the_model_says_nothing(client, pool):
    pool.events = [text("..."), summary(1)]
    response = await client.post("/v1/audio/speech", json=_speech(response_format="wav"))
    with wave.open(io.BytesIO(response.content)) as w:
        assert response.status_code == 200 and w.getnframes() == 0


def _transcribe(client, fields: dict | None = None, files: dict | None = None, **kwargs):
    wav = media_factory.make_wav(seconds=1.0)
    return client.post(
        "/v1/audio/transcriptions",
        data={"model": "omni", **(fields or {})},
        files=files if files is not None else {"file": ("speech.wav", wav, "audio/wav")},
        **kwargs,
    )


async def test_transcription_decodes_the_file_and_answers_json(client, pool):
    pool.events = [text("Hello"), text(" world"), summary(2)]
    response = await _transcribe(client)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == "Hello world" and body["usage"]["type"] == "tokens"
    sent = pool.calls[0][0]
    audio, instruction = sent.messages[0].content
    assert audio.audio is not None and audio.audio.sample_rate == 16000, "decoded by the media path"
    assert len(audio.audio.samples) == 16000 and "Transcribe" in instruction.text
    assert sent.mode.value == "text"


async def test_transcription_as_text_and_as_server_sent_events(client, pool):
    pool.events = [text("Hello"), text(" world"), summary(2)]
    plain = await _transcribe(client, {"response_format": "text"})
    assert plain.status_code == 200 and plain.headers["content-type"].startswith("text/plain")
    assert plain.text == "Hello world"
    async with _transcribe_stream(client) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert [e["type"] for e in events] == ["transcript.text.delta"] * 2 + ["transcript.text.done"]
    assert events[-1]["text"] == "Hello world"


def _transcribe_stream(client):
    wav = media_factory.make_wav(seconds=1.0)
    return client.stream(
        "POST",
        "/v1/audio/transcriptions",
        data={"stream": "true"},
        files={"file": ("speech.wav", wav, "audio/wav")},
    )


async def test_transcription_refusals(client, pool, registry):
    json_body = await client.post("/v1/audio/transcriptions", json={"file": "x"})
    assert json_body.status_code == 400 and "multipart/form-data" in json_body.json()["error"]["message"]
    missing = await _transcribe(client, files={"other": ("a.wav", b"RIFF", "audio/wav")})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    srt = await _transcribe(client, {"response_format": "srt"})
    assert srt.status_code == 400 and srt.json()["error"]["param"] == "response_format"
    not_audio = await _transcribe(client, files={"file": ("a.wav", b"this is not audio at all", "audio/wav")})
    assert not_audio.status_code == 400, not_audio.text
    pool.info = TEXT_MODEL
    deaf = await _transcribe(client, {"model": "text-model"})
    assert deaf.status_code == 400 and "cannot take audio input" in deaf.json()["error"]["message"]
    assert not pool.calls
    assert _generate_count(registry, "INVALID_ARGUMENT", "unknown") == 4
    assert _generate_count(registry, "INVALID_ARGUMENT", "text") == 1, "the undecodable file: in the core"


async def test_an_audio_file_over_the_inline_audio_limit_is_413(pool, registry):
    async with _client(pool, registry, GatewaySettings(max_audio_bytes=10_000)) as client:
        response = await _transcribe(client)
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]
    assert not pool.calls


async def test_with_api_keys_both_routes_need_a_valid_key(pool, registry, tmp_path):
    secret_volume(tmp_path, {"api-keys": b"alice:s3cret-alice\n"})
    settings = GatewaySettings(api_keys_file=str(tmp_path / "api-keys"))
    right = {"Authorization": "Bearer s3cret-alice"}
    async with _client(pool, registry, settings) as client:
        assert (await client.post("/v1/audio/speech", json=_speech())).status_code == 401
        assert (await _transcribe(client)).status_code == 401
        assert (await client.post("/v1/audio/speech", json=_speech(), headers=right)).status_code == 200
        pool.events = [text("Hi"), summary(1)]
        assert (await _transcribe(client, headers=right)).status_code == 200
    assert len(pool.calls) == 2
