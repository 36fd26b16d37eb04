"""The OpenAI-compatible HTTP routes (``openai_api/routes/``) on their own: the real ASGI app over a real
``GatewayCore``, driven in-process through httpx's ASGI transport, with a fake worker pool named as one
(tests/support/fake_workers.py). The same door over real sockets and a real worker, with the official
``openai`` SDK, is tested in tests/integration/test_openai_api.py."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from prometheus_client import CollectorRegistry

from omnigate.conversation import Modality, ModelInfo
from omnigate_gateway.openai_api.app import create_app
from omnigate_gateway.settings import GatewaySettings
from tests.support.certs import secret_volume
from tests.support.fake_workers import FakeWorkerPool, core_over, rpc_error, summary, text

MODEL = "fake/text-model"


class FakeHealth:
    """A fake of the gateway's gRPC health probe (``routes.health.grpc_health_probe``): every service SERVING
    except those in ``not_serving``."""

    def __init__(self) -> None:
        self.not_serving: set[str] = set()
        self.asked: list[str] = []

    async def __call__(self, service: str) -> bool:
        self.asked.append(service)
        return service not in self.not_serving


@pytest.fixture
def pool() -> FakeWorkerPool:
    return FakeWorkerPool()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def health() -> FakeHealth:
    return FakeHealth()


def _client(pool, registry, health, settings: GatewaySettings | None = None) -> httpx.AsyncClient:
    settings = settings or GatewaySettings()
    app = create_app(core_over(pool, registry, settings), settings, health)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test")


@pytest.fixture
async def client(pool, registry, health):
    async with _client(pool, registry, health) as client:
        yield client


def _chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], **fields}


async def test_chat_completion_answers_the_workers_text_with_usage_and_the_request_id(client, pool):
    response = await client.post("/v1/chat/completions", json=_chat(), headers={"X-Request-ID": "req-http-1"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    message = body["choices"][0]["message"]
    assert (message["role"], message["content"]) == ("assistant", "Hello")
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2
    assert response.headers["x-request-id"] == "req-http-1"
    assert pool.calls[0][0].request_id == "req-http-1"


async def test_streamed_chat_completion_is_server_sent_events_ending_in_done(client):
    async with client.stream("POST", "/v1/chat/completions", json=_chat(stream=True)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == "Hello"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


async def test_text_completion_takes_a_prompt(client, pool):
    response = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "Once upon", "max_tokens": 8}
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "Hello"
    sent = pool.calls[0][0]
    assert sent.messages[0].content[0].text == "Once upon" and sent.params.max_new_tokens == 8


async def test_models_list_the_served_model_and_an_unknown_one_is_404_in_openais_shape(client):
    listed = (await client.get("/v1/models")).json()
    assert [m["id"] for m in listed["data"]] == [MODEL]
    assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL
    missing = await client.get("/v1/models/no-such-model")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("path", "service"),
    [("/health", ""), ("/health/readiness", "readiness"), ("/health/liveness", "liveness")],
)
async def test_each_health_route_answers_its_own_grpc_health_service(client, health, path, service):
    answer = await client.get(path)
    assert answer.status_code == 200 and answer.json() == {"status": "SERVING"}
    assert health.asked == [service]
    # Another service down changes nothing here (a worker outage leaves readiness and liveness SERVING).
    health.not_serving = {s for s in ("", "readiness", "liveness") if s != service}
    assert (await client.get(path)).status_code == 200
    health.not_serving = {service}
    answer = await client.get(path)
    assert answer.status_code == 503 and answer.json() == {"status": "NOT_SERVING"}
    assert (await client.head(path)).status_code == 503


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/no-such-route", 404), ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405)],
)
async def test_unknown_routes_and_methods_answer_in_openais_error_shape(client, method, path, status):
    response = await client.request(method, path)
    assert response.status_code == status
    assert set(response.json()["error"]) >= {"message", "type", "code"}
    if status == 405:
        assert response.headers["allow"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"temperature": 3.0}, "temperature"), ({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n")],
)
async def test_a_bad_parameter_is_400_naming_it_and_never_reaches_a_worker(client, pool, fields, param):
    response = await client.post("/v1/chat/completions", json=_chat(**fields))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert pool.calls == []


async def test_an_image_request_to_a_text_model_is_400(client, pool):
    response = await client.post("/v1/images/generations", json={"model": MODEL, "prompt": "a red square"})
    assert response.status_code == 400
    assert "cannot generate image" in response.json()["error"]["message"]
    assert pool.calls == []


async def test_speech_output_needs_a_model_that_speaks(client, pool):
    response = await client.post("/v1/chat/completions", json=_chat(modalities=["text", "audio"]))
    assert response.status_code == 400
    pool.info = ModelInfo(
        MODEL, "FakeOmni", [Modality.TEXT], [Modality.TEXT, Modality.AUDIO], 24000, 24000, ["Chelsie"]
    )
    pool.events = [text("Hi"), summary(1)]
    response = await client.post(
        "/v1/chat/completions",
        json=_chat(modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "wav"}),
    )
    assert response.status_code == 200, response.text
    assert pool.calls[-1][0].speaker == "Chelsie" and pool.calls[-1][0].mode.value == "audio"


async def test_a_worker_failure_is_503_and_a_missing_worker_too(client, pool):
    pool.events = [rpc_error(grpc.StatusCode.UNAVAILABLE, "socket closed")]
    failed = await client.post("/v1/chat/completions", json=_chat())
    assert failed.status_code == 503
    pool.info = None
    missing = await client.post("/v1/chat/completions", json=_chat())
    assert missing.status_code == 503
    assert missing.headers["retry-after"] == "30"  # no worker yet: retry after a cold start's delay


async def test_with_api_keys_a_request_without_a_valid_key_is_401(pool, registry, health, tmp_path):
    secret_volume(tmp_path, {"api-keys": b"alice:s3cret-alice\n"})
    settings = GatewaySettings(api_keys_file=str(tmp_path / "api-keys"))
    async with _client(pool, registry, health, settings) as client:
        assert (await client.post("/v1/chat/completions", json=_chat())).status_code == 401
        wrong = {"Authorization": "Bearer s3cret-bob"}
        assert (await client.post("/v1/chat/completions", json=_chat(), headers=wrong)).status_code == 401
        right = {"Authorization": "Bearer s3cret-alice"}
        assert (await client.post("/v1/chat/completions", json=_chat(), headers=right)).status_code == 200
    assert len(pool.calls) == 1
