"""``GatewayService.Converse`` end to end with the SDK, blocking and asyncio, against a real gateway and worker
(the tiny Qwen2.5-Omni, which takes audio and speaks).

A written turn (an item and ``create_response``) is answered with the transcript and the speech, which
decodes to non-silent 24 kHz PCM; a spoken turn (``tests.support.speech_like`` audio in 100 ms chunks) is
found by server VAD, committed and answered; a client that disconnects mid-answer stops the worker (it
counts a cancelled request); a refused message leaves the conversation open; a half-closed conversation
ends once its answer is done; no API key is UNAUTHENTICATED. The gateway here has API keys of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import wave
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from omnigate_client import (
    AsyncConversation,
    AsyncOmnigateClient,
    AudioCommitted,
    Conversation,
    ConverseEvent,
    EventRefused,
    ItemCreated,
    OmnigateClient,
    OmnigateClientError,
    OutputAudioDelta,
    OutputTextDelta,
    ResponseCreated,
    ResponseDone,
    SessionCreated,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
)
from tests.support import speech_like
from tests.support.media_factory import write_samples
from tests.support.stack import REPO_DIR, Service, metric_sum, scrape_metrics, start_service, wait_serving
from tests.support.waiting import async_wait_until

pytestmark = pytest.mark.slow

KEY = "converse-secret-0123"


@pytest.fixture(scope="module")
def gateway(omni_stack, tmp_path_factory) -> Iterator[Service]:
    """A gateway of its own on the shared worker (its metrics count this module's conversations only)."""
    workdir = tmp_path_factory.mktemp("converse")
    keys = workdir / "keys.txt"
    keys.write_text(f"alice:{KEY}\n")
    service = start_service(
        "gateway-converse",
        "omnigate_gateway.main",
        {
            "OMNIGATE_GATEWAY_WORKER_TARGET": omni_stack.worker.target,
            "OMNIGATE_GATEWAY_WORKER_CHECK_INTERVAL_S": "0.5",
            "OMNIGATE_GATEWAY_API_KEYS_FILE": str(keys),
        },
        workdir,
    )
    try:
        wait_serving(service, timeout_s=60)
        yield service
    finally:
        assert service.stop() == 0, service.log_tail()


class Blocking:
    """The blocking SDK's ``Conversation`` behind the asyncio one's interface (each call in a thread), so
    one scenario runs on both SDKs."""

    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.conversation, name)
        if not callable(attribute):
            return attribute

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(attribute, *args, **kwargs)

        return call

    async def next(self) -> ConverseEvent:
        return await asyncio.to_thread(next, self.conversation)

    async def rest(self) -> list[ConverseEvent]:
        return await asyncio.to_thread(list, self.conversation)


class Asyncio:
    """The asyncio SDK's ``AsyncConversation``, with the same ``next`` and ``rest`` as ``Blocking``."""

    def __init__(self, conversation: AsyncConversation) -> None:
        self.conversation = conversation

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conversation, name)

    async def next(self) -> ConverseEvent:
        return await anext(self.conversation)

    async def rest(self) -> list[ConverseEvent]:
        return [event async for event in self.conversation]


@pytest.fixture(params=["blocking", "asyncio"])
async def converse(request, gateway):
    """Opens conversations (``async with converse(**settings) as conversation``) with one SDK or the other,
    both seen through the asyncio interface (``Blocking``, ``Asyncio``)."""

    @contextlib.asynccontextmanager
    async def open_conversation(api_key: str | None = KEY, **settings: Any) -> AsyncIterator[Any]:
        if request.param == "blocking":
            with OmnigateClient(gateway.target, api_key=api_key) as client:
                with client.converse(**settings) as conversation:
                    yield Blocking(conversation)
        else:
            async with AsyncOmnigateClient(gateway.target, api_key=api_key) as client:
                async with client.converse(**settings) as conversation:
                    yield Asyncio(conversation)

    return open_conversation


def _answer(events: list[ConverseEvent]) -> tuple[str, np.ndarray, ResponseDone]:
    """An answer's transcript, its speech as float samples, and its ResponseDone."""
    transcript = "".join(e.text for e in events if isinstance(e, OutputTextDelta) and e.transcript)
    audio = [e.audio for e in events if isinstance(e, OutputAudioDelta)]
    assert all(chunk.sample_rate == 24000 and chunk.channels == 1 for chunk in audio)
    assert [chunk.sequence for chunk in audio] == list(range(len(audio)))
    samples = (
        np.concatenate([chunk.pcm() for chunk in audio]).astype(np.float32) / 32768 if audio else np.zeros(0)
    )
    done = events[-1]
    assert isinstance(done, ResponseDone)
    return transcript, samples, done


def _spoken_answer(events: list[ConverseEvent]) -> ResponseDone:
    transcript, samples, done = _answer(events)
    assert done.response.status in {"completed", "incomplete"}, done  # incomplete: max_output_tokens
    assert done.response.usage is not None and done.response.usage.output_tokens >= 1
    assert transcript and done.response.text == transcript
    assert samples.size > 2400 and np.sqrt(np.mean(samples**2)) > 1e-3, "non-silent 24 kHz speech"
    return done


def _worker_cancelled(omni_stack) -> float:
    return metric_sum(scrape_metrics(omni_stack.worker), "omnigate_worker_requests_total", code="CANCELLED")


async def test_a_written_turn_is_answered_with_speech(converse):
    settings = {"instructions": "Answer briefly.", "turn_detection": False, "max_output_tokens": 8}
    async with converse(**settings) as conversation:
        created, updated = await conversation.next(), await conversation.next()
        assert isinstance(created, SessionCreated) and isinstance(updated, SessionUpdated)
        assert created.session.output_mode == "audio" and created.session.voice == "Chelsie"
        assert updated.session.turn_detection is None and updated.session.max_output_tokens == 8
        assert conversation.session == updated.session and conversation.request_id

        await conversation.create_item(text="Hello, who are you?")
        await conversation.create_response()
        events = await conversation.until(ResponseDone)
        item = next(e for e in events if isinstance(e, ItemCreated))
        assert item.item.role == "user" and item.item.text == "Hello, who are you?"
        response = next(e for e in events if isinstance(e, ResponseCreated)).response
        done = _spoken_answer(events)
        assert done.response.id == response.id and done.response.voice == "Chelsie"

        # A message the gateway cannot take is refused in-band; the conversation goes on.
        await conversation.update_session(voice="nobody", event_id="bad-voice")
        await conversation.commit(event_id="empty")  # nothing buffered
        refused = [(await conversation.until(EventRefused))[-1] for _ in range(2)]
        assert [(r.event_id, r.reason, r.field) for r in refused] == [
            ("bad-voice", "invalid_value", "voice"),
            ("empty", "input_audio_buffer_commit_empty", None),
        ]
        assert "Chelsie" in refused[0].message
        await conversation.create_response(output_mode="text", max_output_tokens=4)
        _, samples, done = _answer(await conversation.until(ResponseDone))
        assert done.response.output_mode == "text" and samples.size == 0
        assert done.response.status in {"completed", "incomplete"} and done.response.text

        await conversation.end_input()
        assert await conversation.rest() == [], "half-closed with no answer running: the stream ends at once"


async def test_a_spoken_turn_is_found_by_server_vad_and_answered(converse):
    async with converse(max_output_tokens=8) as conversation:
        await conversation.until(SessionUpdated)
        assert conversation.session.turn_detection is not None, "server VAD is on by default"
        audio = np.concatenate([speech_like.silence(0.5), speech_like.speech(1.5), speech_like.silence(1.0)])
        for start in range(0, audio.size, 2400):  # 100 ms chunks of float samples, as from a microphone
            await conversation.append_audio(audio[start : start + 2400])
        await conversation.end_input()  # the answer VAD started still runs to its end
        events = await conversation.rest()
    kinds = [type(e).__name__ for e in events]
    for earlier, later in [
        ("SpeechStarted", "SpeechStopped"),
        ("SpeechStopped", "AudioCommitted"),
        ("AudioCommitted", "ItemCreated"),
        ("ItemCreated", "ResponseCreated"),
        ("ResponseCreated", "OutputAudioDelta"),
    ]:
        assert kinds.index(earlier) < kinds.index(later), kinds
    started = next(e for e in events if isinstance(e, SpeechStarted))
    stopped = next(e for e in events if isinstance(e, SpeechStopped))
    assert 0 <= started.audio_start_ms <= 500 and 2450 <= stopped.audio_end_ms <= 2800
    committed = next(e for e in events if isinstance(e, AudioCommitted))
    user = next(e for e in events if isinstance(e, ItemCreated)).item
    assert started.item_id == stopped.item_id == committed.item_id == user.id
    assert user.content[0].kind == "audio" and 2000 <= user.content[0].duration_ms <= 2800
    _spoken_answer(events)  # the half-closed stream ended with the answer's ResponseDone


async def test_a_client_that_disconnects_mid_answer_stops_the_worker(omni_stack, gateway, converse):
    cancelled_before = _worker_cancelled(omni_stack)
    async with converse(turn_detection=False) as conversation:
        await conversation.create_item(text="Tell me a long story.")
        await conversation.create_response(max_output_tokens=2000)
        await conversation.until(OutputAudioDelta)
    # leaving the block cancelled the call mid-answer
    await async_wait_until(lambda: _worker_cancelled(omni_stack) == cancelled_before + 1, timeout_s=30)
    await async_wait_until(
        lambda: metric_sum(scrape_metrics(gateway), "omnigate_gateway_realtime_sessions") == 0, timeout_s=10
    )


async def test_a_conversation_needs_an_api_key(converse):
    for key in (None, "wrong"):
        async with converse(api_key=key) as conversation:
            with pytest.raises(OmnigateClientError) as refused:
                await conversation.next()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert refused.value.request_id


def test_the_docs_examples_run(gateway, tmp_path):
    """docs/usage.md's Converse examples, as written but for the gateway's address and key."""
    docs = (REPO_DIR / "docs" / "usage.md").read_text()
    section = docs[docs.index("## Live conversations (Converse)") :].split("\n## ", 1)[0]
    examples = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(examples) == 2
    write_samples(str(tmp_path / "demo-media"))
    for example, expected in zip(
        examples,
        [
            r"^(completed|incomplete): \d+\.\d s of speech\n(completed|incomplete): '.+' \(Usage",
            r"^(completed|incomplete)$",
        ],
        strict=True,
    ):
        for name in ("OmnigateClient", "AsyncOmnigateClient"):
            example = example.replace(
                f'{name}("127.0.0.1:50051")', f'{name}("{gateway.target}", api_key="{KEY}")'
            )
        ran = subprocess.run(
            [sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert ran.returncode == 0, ran.stderr
        assert re.search(expected, ran.stdout, re.M), ran.stdout
    with wave.open(str(tmp_path / "answer.wav")) as answer:
        assert answer.getframerate() == 24000 and answer.getnframes() > 2400
