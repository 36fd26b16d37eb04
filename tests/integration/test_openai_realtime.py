"""``/v1/realtime`` with the official ``openai`` SDK, unmodified, against a real gateway and worker (the tiny
Qwen2.5-Omni, which takes audio and speaks).

The user's turns are speech-like audio (``tests.support.speech_like``: Silero VAD hears speech in it) sent
as 16-bit PCM at 24 kHz in 100 ms chunks; server VAD turns the pause after it into a committed item and an
answer, whose transcript and audio stream back. A second answer is interrupted by the user speaking again
(barge-in) and a third by ``response.cancel``: each ends ``cancelled`` and its worker call is cancelled
(the worker counts a cancelled request). The gateway here has API keys and a short idle timeout.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
import websockets.sync.client
from websockets.exceptions import InvalidStatus

from tests.support import speech_like
from tests.support.media_factory import write_samples
from tests.support.stack import REPO_DIR, Service, metric_sum, scrape_metrics, start_service, wait_serving
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

KEY = "realtime-secret-0123"
IDLE_TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def gateway(omni_stack, tmp_path_factory) -> Iterator[Service]:
    """A gateway of its own on the shared worker (its metrics count this module's sessions only)."""
    workdir = tmp_path_factory.mktemp("realtime")
    keys = workdir / "keys.txt"
    keys.write_text(f"alice:{KEY}\n")
    service = start_service(
        "gateway-realtime",
        "omnigate_gateway.main",
        {
            "OMNIGATE_GATEWAY_WORKER_TARGET": omni_stack.worker.target,
            "OMNIGATE_GATEWAY_WORKER_CHECK_INTERVAL_S": "0.5",
            "OMNIGATE_GATEWAY_API_KEYS_FILE": str(keys),
            "OMNIGATE_GATEWAY_REALTIME_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
        },
        workdir,
    )
    try:
        wait_serving(service, timeout_s=60)
        yield service
    finally:
        assert service.stop() == 0, service.log_tail()


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.http_port}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def _send_audio(connection, samples: np.ndarray) -> None:
    for chunk in speech_like.chunks(speech_like.pcm16(samples)):
        connection.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())


def _until(connection, kind: str, seen: list | None = None, timeout_s: float = 120):
    """Events up to the first of type ``kind`` (returned); the others go to ``seen``."""
    deadline = time.monotonic() + timeout_s
    for event in connection:
        if event.type == kind:
            return event
        if seen is not None:
            seen.append(event)
        assert event.type != "error", event
        assert time.monotonic() < deadline, f"no {kind} in {timeout_s} s"
    raise AssertionError(f"the connection closed before {kind}")


def _decoded(events) -> tuple[np.ndarray, str]:
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
    transcript = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    return np.frombuffer(audio, dtype="<i2").astype(np.float32) / 32768, transcript


def _worker_cancelled(omni_stack) -> float:
    return metric_sum(scrape_metrics(omni_stack.worker), "omnigate_worker_requests_total", code="CANCELLED")


def test_a_spoken_conversation_with_barge_in(omni_stack, gateway, client, model):
    with client.realtime.connect(model=model) as connection:
        created = connection.recv()
        assert created.type == "session.created"
        session = created.session
        assert session.output_modalities == ["audio"] and session.audio.output.voice == "Chelsie"
        assert (
            session.audio.input.format.rate == 24000
            and session.audio.input.turn_detection.type == "server_vad"
        )
        connection.session.update(
            session={"type": "realtime", "instructions": "Answer briefly.", "max_output_tokens": 8}
        )
        assert _until(connection, "session.updated").session.max_output_tokens == 8

        # Turn 1: the user speaks for 1.5 s and pauses; server VAD commits the speech and answers it.
        _send_audio(
            connection,
            np.concatenate([speech_like.silence(0.5), speech_like.speech(1.5), speech_like.silence(1.0)]),
        )
        events: list = []
        done = _until(connection, "response.done", events)
        kinds = [e.type for e in events]
        for earlier, later in [
            ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"),
            ("input_audio_buffer.speech_stopped", "input_audio_buffer.committed"),
            ("input_audio_buffer.committed", "conversation.item.created"),
            ("conversation.item.created", "response.created"),
            ("response.created", "response.output_audio.delta"),
        ]:
            assert kinds.index(earlier) < kinds.index(later), kinds
        started = next(e for e in events if e.type == "input_audio_buffer.speech_started")
        stopped = next(e for e in events if e.type == "input_audio_buffer.speech_stopped")
        assert 0 <= started.audio_start_ms <= 500, (
            "the speech starts at 0.5 s, less the 300 ms prefix padding"
        )
        # 500 ms of silence after the speech ends at 2.0 s (Silero's recurrent state lags by a window or two)
        assert 2450 <= stopped.audio_end_ms <= 2800, stopped
        assert started.item_id == stopped.item_id
        user = next(e.item for e in events if e.type == "conversation.item.created")
        assert user.id == started.item_id and user.role == "user" and user.content[0].type == "input_audio"
        assert done.response.status in {"completed", "incomplete"} and done.response.usage.output_tokens >= 1
        samples, transcript = _decoded(events)
        assert transcript and done.response.output[0].content[0].transcript == transcript
        assert samples.size > 2400 and np.sqrt(np.mean(samples**2)) > 1e-3, "non-silent 24 kHz speech"

        # Turn 2: a long answer, interrupted by the user speaking while it plays.
        cancelled_before = _worker_cancelled(omni_stack)
        connection.response.create(response={"max_output_tokens": 2000})
        _until(connection, "response.output_audio.delta")
        interrupted = time.monotonic()
        _send_audio(connection, speech_like.speech(1.0, seed=1))
        events = []
        done = _until(connection, "response.done", events)
        barge_in_s = time.monotonic() - interrupted
        assert "input_audio_buffer.speech_started" in [e.type for e in events]
        assert done.response.status == "cancelled" and done.response.status_details.reason == "turn_detected"
        wait_until(lambda: _worker_cancelled(omni_stack) == cancelled_before + 1, timeout_s=30)
        logged = re.findall(
            r"barge-in: the answer's worker call was cancelled ([\d.]+) ms", gateway.log_path.read_text()
        )
        assert logged, gateway.log_tail()
        print(
            f"\nbarge-in: speech sent -> response.done at the client {barge_in_s * 1000:.0f} ms; "
            f"speech detected -> worker call cancelled {float(logged[-1]):.1f} ms (gateway)"
        )

        # The user's speech goes on without a pause: clear it; then an answer cancelled by the client.
        connection.input_audio_buffer.clear()
        _until(connection, "input_audio_buffer.cleared")
        connection.response.create()
        response = _until(connection, "response.created").response
        connection.response.cancel(response_id=response.id)
        done = _until(connection, "response.done")
        assert done.response.id == response.id and done.response.status == "cancelled"
        assert done.response.status_details.reason == "client_cancelled"

        # Unknown and unsupported events get an error naming them; the connection stays open.
        connection.send({"type": "conversation.item.delete", "item_id": user.id})
        error = connection.recv()
        assert error.type == "error" and "conversation.item.delete" in error.error.message
        connection.send({"type": "made.up", "event_id": "evt_1"})
        error = connection.recv()
        assert (
            error.type == "error" and error.error.code == "unknown_event" and error.error.event_id == "evt_1"
        )
        assert "made.up" in error.error.message
        connection.session.update(session={"type": "realtime", "audio": {"output": {"voice": "ethan"}}})
        assert _until(connection, "session.updated").session.audio.output.voice == "Ethan"

    metrics = scrape_metrics(gateway)
    assert metric_sum(metrics, "omnigate_gateway_realtime_barge_ins_total") == 1
    assert metric_sum(metrics, "omnigate_gateway_realtime_responses_total", status="cancelled") == 2
    wait_until(
        lambda: metric_sum(scrape_metrics(gateway), "omnigate_gateway_realtime_sessions") == 0, timeout_s=10
    )


def test_text_turns_without_server_vad(client, model):
    with client.realtime.connect(model=model) as connection:
        assert connection.recv().type == "session.created"
        connection.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["text"],
                "max_output_tokens": 4,
                "audio": {"input": {"turn_detection": None}},
            }
        )
        assert _until(connection, "session.updated").session.audio.input.turn_detection is None
        connection.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}
        )
        assert _until(connection, "conversation.item.created").item.content[0].text == "Hi"
        _send_audio(connection, speech_like.speech(0.5))  # no VAD: nothing happens until a commit
        connection.input_audio_buffer.commit()
        assert _until(connection, "input_audio_buffer.committed").item_id
        connection.response.create()
        events: list = []
        done = _until(connection, "response.done", events)
        assert done.response.output_modalities == ["text"] and done.response.status in {
            "completed",
            "incomplete",
        }
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text and done.response.output[0].content[0].text == text
        assert not any(e.type == "response.output_audio.delta" for e in events)


def test_handshake_needs_a_key_and_the_served_model(gateway, model):
    url = f"ws://127.0.0.1:{gateway.http_port}/v1/realtime?model={model}"
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401)):
        with pytest.raises(InvalidStatus) as refused:
            websockets.sync.client.connect(url, additional_headers=headers, open_timeout=10)
        assert refused.value.response.status_code == status
        assert b"invalid_api_key" in refused.value.response.body
    with pytest.raises(InvalidStatus) as refused:
        websockets.sync.client.connect(
            url.replace(f"model={model}", "model=gpt-realtime"),
            additional_headers={"Authorization": f"Bearer {KEY}"},
            open_timeout=10,
        )
    assert refused.value.response.status_code == 404
    plain = httpx.get(url.replace("ws://", "http://"), timeout=10)  # not an upgrade
    assert plain.status_code == 426 and plain.headers["upgrade"] == "websocket"
    assert plain.json()["error"]["code"] == "upgrade_required" and plain.headers["x-request-id"]


def test_an_idle_session_is_closed(client, model):
    with client.realtime.connect(model=model) as connection:
        assert connection.recv().type == "session.created"
        started = time.monotonic()
        error = connection.recv()
        assert error.type == "error" and error.error.code == "session_expired"
        assert IDLE_TIMEOUT_S - 0.5 <= time.monotonic() - started <= IDLE_TIMEOUT_S + 5
        with pytest.raises(websockets.exceptions.ConnectionClosedOK):
            connection.recv()


def test_the_docs_example_runs(gateway, tmp_path):
    """docs/openai-api.md's realtime example, as written but for the gateway's address and key."""
    docs = (REPO_DIR / "docs" / "openai-api.md").read_text()
    section = docs[docs.index("## `/v1/realtime` (WebSocket)") :]
    example = section[section.index("```python\n") + 10 : section.index("```\n", section.index("```python"))]
    example = example.replace("http://127.0.0.1:8000/v1", f"http://127.0.0.1:{gateway.http_port}/v1")
    example = example.replace('api_key="unused"', f'api_key="{KEY}"')
    write_samples(str(tmp_path / "demo-media"))  # what `make demo-media` writes, sound.wav among it
    ran = subprocess.run(
        [sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    assert re.search(r"^(completed|incomplete): \d+\.\d s of speech$", ran.stdout, re.MULTILINE), ran.stdout
    with wave.open(str(tmp_path / "answer.wav")) as answer:
        assert answer.getframerate() == 24000 and answer.getnframes() > 2400


def test_a_client_that_vanishes_mid_answer_stops_the_worker(omni_stack, gateway, model):
    cancelled_before = _worker_cancelled(omni_stack)
    connection = websockets.sync.client.connect(
        f"ws://127.0.0.1:{gateway.http_port}/v1/realtime?model={model}",
        additional_headers={"Authorization": f"Bearer {KEY}"},
        open_timeout=10,
    )
    assert json.loads(connection.recv(timeout=10))["type"] == "session.created"
    item = {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": "Tell me a story."}],
    }
    connection.send(json.dumps({"type": "conversation.item.create", "item": item}))
    connection.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 2000}}))
    while json.loads(connection.recv(timeout=60))["type"] != "response.output_audio.delta":
        pass
    connection.socket.shutdown(socket.SHUT_RDWR)  # gone, without a close frame
    connection.close()
    wait_until(lambda: _worker_cancelled(omni_stack) == cancelled_before + 1, timeout_s=30)
    wait_until(
        lambda: metric_sum(scrape_metrics(gateway), "omnigate_gateway_realtime_sessions") == 0, timeout_s=10
    )
    assert metric_sum(scrape_metrics(gateway), "omnigate_gateway_in_flight_requests") == 0
