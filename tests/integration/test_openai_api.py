"""The OpenAI-compatible HTTP API against the real gateway and worker processes.

The official ``openai`` package, unmodified, talks to the gateway's HTTP port; raw HTTP (httpx) checks the
error bodies, status codes and headers. Every error code the gateway can produce is provoked for real: a
refused URL, a body over the limit, a per-key rate limit, a gateway whose worker is down, a deadline.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import ssl
import time
import wave

import httpx
import numpy as np
import openai
import PIL.Image
import pytest
import soundfile
from cryptography import x509

from omnigate_client import OmnigateClient
from tests.support import media_factory
from tests.support.certs import Authority
from tests.support.stack import Service, start_service, wait_serving

pytestmark = pytest.mark.slow

KEY = "alice-secret-0123"
LIMITED_KEY = "limited-secret-4567"


def _sdk(service: Service, api_key: str = "unused", **kwargs) -> openai.OpenAI:
    # max_retries=0: the SDK retries 429/5xx by itself; tests want to see each answer.
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{service.http_port}/v1",
        api_key=api_key,
        max_retries=0,
        timeout=120,
        **kwargs,
    )


def _http(service: Service) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{service.http_port}", timeout=120)


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    assert response.headers["x-request-id"]
    return body["error"]


def _stream(client: openai.OpenAI, model: str, messages, **kwargs):
    """Streams a chat completion; returns (text, transcript, audio bytes, finish reason, usage, chunk count)."""
    text, transcript, audio, finish, usage, count = "", "", b"", None, None, 0
    for chunk in client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs
    ):
        count += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            text += delta.content or ""
            if delta.audio is not None:
                transcript += delta.audio.transcript or ""
                audio += base64.b64decode(delta.audio.data) if delta.audio.data else b""
            finish = choice.finish_reason or finish
    return text, transcript, audio, finish, usage, count


@pytest.fixture(scope="module")
def sdk(omni_stack) -> openai.OpenAI:
    return _sdk(omni_stack.gateway)


@pytest.fixture(scope="module")
def model(sdk) -> str:
    return sdk.models.list().data[0].id


@pytest.fixture(scope="module")
def text_only_prompt_tokens(sdk, model) -> int:
    reply = sdk.chat.completions.create(model=model, messages=_user(_text("Describe it.")), max_tokens=2)
    return reply.usage.prompt_tokens


# ---- the acceptance: the openai SDK, streamed, with each input kind and with speech output -----------


def test_streamed_chat_with_image_url(sdk, model, media_server, text_only_prompt_tokens):
    url = media_server.serve("/openai/picture.png", media_factory.make_png(64, 48))
    text, _, _, finish, usage, count = _stream(
        sdk,
        model,
        _user({"type": "image_url", "image_url": {"url": url}}, _text("Describe it.")),
        max_tokens=8,
    )
    assert text and count >= 4, "text arrives as several chunks"
    assert finish in {"stop", "length"}
    assert 1 <= usage.completion_tokens <= 8
    assert usage.prompt_tokens > text_only_prompt_tokens, "the image's tokens are part of the prompt"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chat_with_data_url_image_and_input_audio(sdk, model, text_only_prompt_tokens):
    png = base64.b64encode(media_factory.make_png(32, 32)).decode()
    wav = base64.b64encode(media_factory.make_wav(seconds=1.0)).decode()
    text, _, _, finish, usage, _ = _stream(
        sdk,
        model,
        _user(
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
            {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
            _text("Describe it."),
        ),
        max_tokens=6,
    )
    assert text and finish in {"stop", "length"}
    assert usage.prompt_tokens > text_only_prompt_tokens + 20, (
        "the image's and audio's tokens are in the prompt"
    )


def test_streamed_chat_with_video_url_and_its_audio_track(sdk, model, media_server, text_only_prompt_tokens):
    url = media_server.serve(
        "/openai/clip.mp4", media_factory.make_mp4(seconds=2.0, fps=10, w=64, h=48, with_audio=True)
    )
    prompts = {}
    for with_audio in (False, True):
        text, _, _, finish, usage, _ = _stream(
            sdk,
            model,
            _user({"type": "video_url", "video_url": {"url": url}}, _text("Describe it.")),
            max_tokens=4,
            extra_body={"mm_processor_kwargs": {"fps": 1, "use_audio_in_video": with_audio}},
        )
        assert text and finish in {"stop", "length"}
        prompts[with_audio] = usage.prompt_tokens
    assert prompts[True] > prompts[False] > text_only_prompt_tokens, (
        "frames, then the audio track, are in the prompt"
    )


def test_speech_output_streamed_and_not(sdk, model):
    messages = _user(_text("Say hello."))
    # The talker samples its speech codes (Qwen2.5-Omni's default), so the random tiny talker may end its
    # speech after a few codes: a seed makes the length reproducible (and long enough for the checks).
    speech = {
        "modalities": ["text", "audio"],
        "audio": {"voice": "ethan", "format": "wav"},
        "max_tokens": 6,
        "seed": 7,
    }
    text, transcript, audio, finish, usage, _ = _stream(sdk, model, messages, **speech)
    assert text == "" and transcript, "speech mode carries the text as the audio's transcript, as OpenAI does"
    assert finish in {"stop", "length"} and usage.completion_tokens >= 1
    samples, rate = soundfile.read(io.BytesIO(audio), dtype="float32")
    assert rate == 24000 and len(samples) > 2400
    assert np.sqrt(np.mean(samples**2)) > 1e-3, "the speech is not silent"
    with wave.open(io.BytesIO(audio)) as w:  # Python's own reader takes the streamed header too
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (24000, 2, 1)

    reply = sdk.chat.completions.create(model=model, messages=messages, **speech)
    message = reply.choices[0].message
    assert message.content is None and message.audio.transcript == transcript  # greedy: the same answer
    assert message.audio.id.startswith("audio_") and message.audio.expires_at > time.time()
    with wave.open(io.BytesIO(base64.b64decode(message.audio.data))) as w:
        assert w.getframerate() == 24000 and w.getnframes() > 2400
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
    assert np.sqrt(np.mean(pcm**2)) > 1e-3

    pcm16 = sdk.chat.completions.create(
        model=model, messages=messages, **{**speech, "audio": {"voice": "Ethan", "format": "pcm16"}}
    )
    raw = base64.b64decode(pcm16.choices[0].message.audio.data)
    assert len(raw) % 2 == 0 and not raw.startswith(b"RIFF") and len(raw) > 4800


def test_non_streamed_chat_is_the_grpc_answer(omni_stack, sdk, model):
    reply = sdk.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "Be brief."}, *_user(_text("Count"))],
        max_tokens=10,
    )
    with OmnigateClient(omni_stack.gateway.target, timeout_s=120) as client:
        grpc_answer = client.generate_all(
            [
                {"role": "system", "content": [_text("Be brief.")]},
                {"role": "user", "content": [_text("Count")]},
            ],
            max_new_tokens=10,
        )
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.content == grpc_answer.text
    assert reply.usage.completion_tokens == grpc_answer.summary.output_tokens
    assert reply.usage.prompt_tokens == grpc_answer.summary.prompt_tokens


def test_models_health_and_request_id(omni_stack, sdk, model):
    with OmnigateClient(omni_stack.gateway.target) as client:
        assert model == client.model_info()["model_id"]
    models = sdk.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [(model, "model", "omnigate")]
    assert sdk.models.retrieve(model.rsplit("/", 1)[-1]).id == model
    with _http(omni_stack.gateway) as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "SERVING"}
        answer = http.post(
            "/v1/chat/completions",
            json={"messages": _user(_text("Hi")), "max_tokens": 2},
            headers={"X-Request-ID": "my-request-42"},
        )
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "my-request-42"
        assert answer.json()["id"] == "chatcmpl-my-request-42"
        _assert_openai_error(http.get("/v1/models/gpt-4o"), 404, "model_not_found")
        _assert_openai_error(http.get("/v1/nothing-here"), 404, "not_found")


def _metric(port: int, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_stops_its_generation(omni_stack, stream):
    gateway, worker = omni_stack.gateway, omni_stack.worker
    cancelled = {"rpc": "Generate", "code": "CANCELLED", "mode": "text"}
    before = _metric(gateway.metrics_port, "omnigate_gateway_requests_total", **cancelled)
    # 4000 tokens take the tiny model far longer than this test waits.
    body = {"messages": _user(_text("Count")), "max_tokens": 4000, "min_tokens": 4000, "stream": stream}
    with _http(gateway) as http:
        if stream:
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                next(
                    line
                    for line in response.iter_lines()
                    if '"content":"' in line and '"content":""' not in line
                )
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/chat/completions", json=body, timeout=2)
    deadline = time.monotonic() + 15
    while _metric(gateway.metrics_port, "omnigate_gateway_requests_total", **cancelled) <= before:
        assert time.monotonic() < deadline, "the gateway did not see the client go"
        time.sleep(0.2)
    while _metric(worker.metrics_port, "omnigate_worker_in_flight_requests") > 0:
        assert time.monotonic() < deadline, "the worker is still generating for a client that left"
        time.sleep(0.2)


# ---- errors: each code the gateway can produce ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"messages": [', None),  # not JSON
        ({"messages": []}, "messages"),
        ({"messages": _user(_text("x")), "n": 3}, "n"),
        ({"messages": _user(_text("x")), "frobnicate": True}, "frobnicate"),
        (
            {"messages": _user({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}})},
            "messages[0].content[0].input_audio.data",
        ),
        (
            {
                "messages": _user(_text("x")),
                "modalities": ["text", "audio"],
                "audio": {"voice": "ethan", "format": "opus"},
            },
            "audio.format",
        ),
    ],
)
def test_bad_requests_are_400(omni_stack, body, param):
    counted = {"rpc": "Generate", "code": "INVALID_ARGUMENT", "mode": "unknown"}
    before = _metric(omni_stack.gateway.metrics_port, "omnigate_gateway_requests_total", **counted)
    with _http(omni_stack.gateway) as http:
        if isinstance(body, str):
            response = http.post(
                "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
            )
        else:
            response = http.post("/v1/chat/completions", json=body)
    error = _assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    # Refused before the core, and still counted like any other request.
    assert (
        _metric(omni_stack.gateway.metrics_port, "omnigate_gateway_requests_total", **counted) == before + 1
    )


def test_core_refusals_are_400_with_the_core_message(sdk, model, media_server):
    # Caught by the core, not the HTTP layer: an unknown voice, and media that is not an image.
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(
            model=model,
            messages=_user(_text("Hi")),
            modalities=["text", "audio"],
            audio={"voice": "Nobody", "format": "wav"},
            max_tokens=3,
        )
    assert "Nobody" in err.value.message and "Ethan" in err.value.message
    url = media_server.serve("/openai/not-an-image.png", b"<html>hello</html>")
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(
            model=model, messages=_user({"type": "image_url", "image_url": {"url": url}}), max_tokens=3
        )
    assert err.value.body["code"] == "invalid_argument"


def test_refused_sources_are_403(omni_stack, sdk, model):
    with pytest.raises(openai.PermissionDeniedError) as err:
        sdk.chat.completions.create(
            model=model,
            messages=_user({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}),
            max_tokens=3,
        )
    assert err.value.status_code == 403 and "file" in err.value.message


def test_deadline_is_504_and_bad_timeouts_are_400(omni_stack, media_server):
    slow = media_server.url("/slow?seconds=8")
    body = {"messages": _user({"type": "image_url", "image_url": {"url": slow}}, _text("x")), "max_tokens": 3}
    with _http(omni_stack.gateway) as http:
        started = time.monotonic()
        response = http.post(
            "/v1/chat/completions", json={**body, "stream": True}, headers={"X-Request-Timeout": "1"}
        )
        assert time.monotonic() - started < 6
        error = _assert_openai_error(response, 504, "deadline_exceeded")
        assert "deadline" in error["message"]
        _assert_openai_error(
            http.post("/v1/chat/completions", json=body, headers={"X-Request-Timeout": "soon"}), 400
        )
    # The openai SDK's own timeout bounds a non-streamed request (X-Stainless-Read-Timeout).
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{omni_stack.gateway.http_port}/v1", api_key="x", max_retries=0, timeout=30
    )
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(
            model="", messages=body["messages"], max_tokens=3, extra_headers={"X-Request-Timeout": "1"}
        )
    assert err.value.status_code == 504


def test_an_error_after_the_first_chunk_ends_the_stream_with_an_error_event(omni_stack, sdk, model):
    # The deadline passes while the answer streams: the status line is long sent, so the error is an event.
    stream = sdk.chat.completions.create(
        model=model,
        messages=_user(_text("Count")),
        max_tokens=4000,
        stream=True,
        extra_body={"min_tokens": 4000},
        extra_headers={"X-Request-Timeout": "2"},
    )
    text = ""
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
    assert text, "some text arrived before the error"
    assert err.value.body["code"] == "deadline_exceeded" and err.value.body["type"] == "timeout_error"


@pytest.fixture(scope="module")
def guarded_gateway(omni_stack, tmp_path_factory):
    """A second gateway on the same worker: API keys (one with a tiny rate limit), a small body limit, a
    small audio limit, and the default URL policy (no private networks)."""
    workdir = tmp_path_factory.mktemp("guarded")
    keys = workdir / "keys.txt"
    keys.write_text(f"alice:{KEY}\nlimited:{LIMITED_KEY}:rps=0.001:burst=1\n")
    gateway = start_service(
        "gateway-guarded",
        "omnigate_gateway.main",
        {
            "OMNIGATE_GATEWAY_WORKER_TARGET": omni_stack.worker.target,
            "OMNIGATE_GATEWAY_WORKER_CHECK_INTERVAL_S": "0.5",
            "OMNIGATE_GATEWAY_API_KEYS_FILE": str(keys),
            "OMNIGATE_GATEWAY_MAX_HTTP_BODY_BYTES": "200000",
            "OMNIGATE_GATEWAY_MAX_AUDIO_BYTES": "20000",
        },
        workdir,
    )
    try:
        wait_serving(gateway, timeout_s=60)
        yield gateway
    finally:
        assert gateway.stop() == 0, gateway.log_tail()


def test_api_keys_401(guarded_gateway, model):
    messages = _user(_text("Hi"))
    for key in (None, "wrong-key"):
        with _http(guarded_gateway) as http:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            response = http.post(
                "/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, headers=headers
            )
        error = _assert_openai_error(response, 401, "invalid_api_key")
        assert error["type"] == "authentication_error"
        if key is None:  # the hint names HTTP's header, not gRPC metadata
            assert "header 'Authorization: Bearer <key>'" in error["message"]
        assert KEY not in response.text
    with pytest.raises(openai.AuthenticationError):
        _sdk(guarded_gateway, "wrong-key").models.list()
    reply = _sdk(guarded_gateway, KEY).chat.completions.create(model=model, messages=messages, max_tokens=2)
    assert reply.choices[0].message.content is not None


def test_private_urls_are_403_by_default(guarded_gateway, model, media_server):
    url = media_server.serve("/openai/private.png", media_factory.make_png(8, 8))
    with pytest.raises(openai.PermissionDeniedError) as err:
        _sdk(guarded_gateway, KEY).chat.completions.create(
            model=model, messages=_user({"type": "image_url", "image_url": {"url": url}}), max_tokens=2
        )
    assert "loopback" in err.value.message


def test_size_limits_are_413(guarded_gateway):
    big_wav = base64.b64encode(media_factory.make_wav(seconds=8.0)).decode()  # ~340 kB of JSON
    small_wav = base64.b64encode(media_factory.make_wav(seconds=1.0)).decode()  # 32 kB: over the audio cap
    with _http(guarded_gateway) as http:
        headers = {"Authorization": f"Bearer {KEY}"}
        for wav, words in ((big_wav, "200000 bytes"), (small_wav, "limit is 20000")):
            body = {"messages": _user({"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}})}
            error = _assert_openai_error(
                http.post("/v1/chat/completions", json=body, headers=headers), 413, "request_too_large"
            )
            assert words in error["message"]
            assert "retry-after" not in http.post("/v1/chat/completions", json=body, headers=headers).headers
        # Without a Content-Length (chunked), the body is counted as it arrives.
        payload = json.dumps(
            {"messages": _user({"type": "input_audio", "input_audio": {"data": big_wav, "format": "wav"}})}
        ).encode()
        chunks = (payload[i : i + 65536] for i in range(0, len(payload), 65536))
        response = http.post(
            "/v1/chat/completions", content=chunks, headers={**headers, "Content-Type": "application/json"}
        )
        assert "content-length" not in response.request.headers
        assert "200000 bytes" in _assert_openai_error(response, 413, "request_too_large")["message"]


def test_rate_limit_is_429_with_retry_after(guarded_gateway, model):
    client = _sdk(guarded_gateway, LIMITED_KEY)
    client.chat.completions.create(model=model, messages=_user(_text("Hi")), max_tokens=2)  # the burst of 1
    with _http(guarded_gateway) as http:
        response = http.post(
            "/v1/chat/completions",
            json={"messages": _user(_text("Hi")), "max_tokens": 2, "stream": True},
            headers={"Authorization": f"Bearer {LIMITED_KEY}"},
        )
    error = _assert_openai_error(response, 429, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error" and "rate limit" in error["message"]
    assert int(response.headers["retry-after"]) >= 1 and int(response.headers["retry-after-ms"]) > 0
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=model, messages=_user(_text("Hi")), max_tokens=2)


def test_no_worker_is_503(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # closed when the block ends: nothing listens there
    gateway = start_service(
        "gateway-no-worker",
        "omnigate_gateway.main",
        {
            "OMNIGATE_GATEWAY_WORKER_TARGET": f"127.0.0.1:{dead}",
            "OMNIGATE_GATEWAY_WORKER_CHECK_INTERVAL_S": "0.2",
        },
        tmp_path,
    )
    try:
        with _http(gateway) as http:
            health = http.get("/health")
            assert health.status_code == 503 and health.json() == {"status": "NOT_SERVING"}
            body = {"messages": _user(_text("Hi")), "max_tokens": 2}
            for stream in (False, True):
                error = _assert_openai_error(
                    http.post("/v1/chat/completions", json={**body, "stream": stream}),
                    503,
                    "service_unavailable",
                )
                assert "no worker is ready" in error["message"]
            _assert_openai_error(http.get("/v1/models"), 503)
        with pytest.raises(openai.InternalServerError) as err:
            _sdk(gateway).chat.completions.create(model="any", messages=body["messages"])
        assert err.value.status_code == 503
    finally:
        assert gateway.stop() == 0, gateway.log_tail()


def test_sigterm_lets_a_streamed_answer_finish(omni_stack, tmp_path, model):
    gateway = start_service(
        "gateway-drain",
        "omnigate_gateway.main",
        {
            "OMNIGATE_GATEWAY_WORKER_TARGET": omni_stack.worker.target,
            "OMNIGATE_GATEWAY_WORKER_CHECK_INTERVAL_S": "0.5",
        },
        tmp_path,
    )
    try:
        wait_serving(gateway, timeout_s=60)
        body = {
            "messages": _user(_text("Say hello.")),
            "max_tokens": 6,
            "stream": True,
            "modalities": ["text", "audio"],
            "audio": {"voice": "Ethan", "format": "pcm16"},
        }
        lines = []
        with _http(gateway) as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and not lines:
                    gateway.process.send_signal(signal.SIGTERM)  # mid-answer
                lines.append(line)
        data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}
        assert any("data" in (c["choices"][0]["delta"].get("audio") or {}) for c in chunks), (
            "the speech arrived"
        )
        assert gateway.process.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{gateway.http_port}/health", timeout=5)
    finally:
        gateway.stop()


def test_with_tls_the_api_is_https_only_and_follows_renewed_certificates(omni_stack, tmp_path, model):
    ca = Authority("openai-test-ca")
    ca_file = ca.write_ca(tmp_path / "ca.crt")
    cert_file, key_file = ca.issue("gateway", ips=("127.0.0.1",)).write(tmp_path, "tls")
    gateway = start_service(
        "gateway-tls",
        "omnigate_gateway.main",
        {
            "OMNIGATE_GATEWAY_WORKER_TARGET": omni_stack.worker.target,
            "OMNIGATE_GATEWAY_WORKER_CHECK_INTERVAL_S": "0.5",
            "OMNIGATE_GATEWAY_TLS_CERT_FILE": str(cert_file),
            "OMNIGATE_GATEWAY_TLS_KEY_FILE": str(key_file),
        },
        tmp_path,
    )
    base = f"https://127.0.0.1:{gateway.http_port}"
    verify = ssl.create_default_context(cafile=str(ca_file))
    try:
        with httpx.Client(base_url=base, verify=verify, timeout=30) as https:
            deadline = time.monotonic() + 60
            while https.get("/health").status_code != 200:
                assert time.monotonic() < deadline, gateway.log_tail()
                time.sleep(0.2)
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, http_client=https)
            assert client.chat.completions.create(
                model=model, messages=_user(_text("Hi")), max_tokens=2
            ).choices
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{gateway.http_port}/health", timeout=10)

        def served_serial() -> int:
            pem = ssl.get_server_certificate(("127.0.0.1", gateway.http_port))  # no SNI: an IP address
            return x509.load_pem_x509_certificate(pem.encode()).serial_number

        assert served_serial() == x509.load_pem_x509_certificate(cert_file.read_bytes()).serial_number
        renewed = ca.issue("gateway", ips=("127.0.0.1",))
        renewed.write(tmp_path, "tls")
        deadline = time.monotonic() + 15
        while served_serial() != renewed.certificate.serial_number:
            assert time.monotonic() < deadline, "the renewed certificate was not picked up"
            time.sleep(0.3)
        assert httpx.get(f"{base}/health", verify=verify, timeout=10).status_code == 200
        assert "HTTP API TLS certificate reloaded" in gateway.log_tail(200)
    finally:
        assert gateway.stop() == 0, gateway.log_tail()


# ---- images ------------------------------------------------------------------------------------------


def test_image_generation_on_janus(janus_stack):
    client = _sdk(janus_stack.gateway)
    model = client.models.list().data[0].id
    result = client.images.generate(model=model, prompt="A red square", response_format="b64_json")
    assert len(result.data) == 1 and result.output_format == "png"
    with PIL.Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))) as picture:
        assert picture.format == "PNG" and picture.width > 0
        assert result.size == f"{picture.width}x{picture.height}"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model=model, prompt="A red square", n=2)
    assert err.value.body["param"] == "n"
    # A text-only model cannot make images: the core says so (400).
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model,
            messages=_user(_text("x")),
            modalities=["text", "audio"],
            audio={"voice": "x", "format": "wav"},
        )
    assert "cannot generate audio" in err.value.message
