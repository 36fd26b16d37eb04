"""The real engine on the tiny checkpoints, in process: streaming, limits, stop strings, cancellation."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from omnigate.conversation import (
    AudioChunk,
    ContentPart,
    GenerationMode,
    GenerationParams,
    GenerationRequest,
    Message,
    Modality,
    Summary,
    TextDelta,
)
from omnigate.errors import InvalidInput
from omnigate.media import Audio
from omnigate_worker.engine import loading


def _request(text="Hello", mode=GenerationMode.TEXT, **params) -> GenerationRequest:
    return GenerationRequest(
        messages=[Message("user", [ContentPart(Modality.TEXT, text=text)])],
        params=GenerationParams(**{"max_new_tokens": 16, **params}),
        mode=mode,
    )


def _run(engine, request, cancelled=None):
    events = []
    engine.validate(request)
    engine.generate(request, events.append, cancelled or threading.Event())
    return events


def test_cpu_defaults(engine):
    assert engine.info.device == "cpu float32"
    assert loading.resolve_attention("auto", loading.resolve_device("cpu")) == "sdpa"


def test_text_streams_and_respects_the_limit(engine):
    events = _run(engine, _request(max_new_tokens=16))
    summary = events[-1]
    assert isinstance(summary, Summary) and summary.output_tokens <= 16
    assert sum(isinstance(e, TextDelta) for e in events) >= 2


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(engine):
    text = lambda events: "".join(e.text for e in events if isinstance(e, TextDelta))  # noqa: E731
    assert text(_run(engine, _request())) == text(_run(engine, _request()))
    a = text(_run(engine, _request(do_sample=True, temperature=1.5, seed=3)))
    b = text(_run(engine, _request(do_sample=True, temperature=1.5, seed=3)))
    assert a == b


def test_stop_string_is_not_returned(engine):
    full = "".join(e.text for e in _run(engine, _request()) if isinstance(e, TextDelta))
    stop = full[3:5]
    events = _run(engine, _request(stop=[stop]))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert events[-1].finish_reason == "stop_sequence"
    assert stop not in text and full.startswith(text)


def test_cancelled_request_stops_without_summary(engine):
    cancelled = threading.Event()
    events = []

    def emit(event):
        events.append(event)
        cancelled.set()  # cancel as soon as the first output arrives

    engine.generate(_request(max_new_tokens=200), emit, cancelled)
    assert not any(isinstance(e, Summary) for e in events)
    assert len(events) < 20


def test_cancelled_speech_request_stops_the_talker_too(engine):
    """A speech request cancelled (client gone, deadline) must not keep the talker running to its limit."""
    talker_steps = []
    hook = engine._model.talker.register_forward_hook(lambda *_: talker_steps.append(1))
    cancelled = threading.Event()
    events = []

    def emit(event):
        events.append(event)
        cancelled.set()  # cancel as soon as the first output arrives

    try:
        request = _request(mode=GenerationMode.AUDIO, max_new_tokens=64, min_new_tokens=64)
        engine.generate(request, emit, cancelled)
    finally:
        hook.remove()
    assert not any(isinstance(e, Summary) for e in events)
    # Without a talker stopping criterion the talker would run up to 64 * 8 codes.
    assert len(talker_steps) <= 3, len(talker_steps)


def test_speech_output(engine):
    events = _run(engine, _request(mode=GenerationMode.AUDIO, max_new_tokens=4))
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert chunks and all(c.sample_rate == 24000 for c in chunks)
    samples = np.concatenate([c.samples for c in chunks])
    assert np.sqrt(np.mean(samples**2)) > 1e-3
    assert events[-1].audio_seconds == pytest.approx(len(samples) / 24000)


def test_validation(engine):
    with pytest.raises(InvalidInput, match="max_new_tokens >= 2"):
        engine.validate(_request(mode=GenerationMode.AUDIO, max_new_tokens=1))
    with pytest.raises(InvalidInput, match="cannot generate image"):
        engine.validate(_request(mode=GenerationMode.IMAGE))
    with pytest.raises(InvalidInput, match="empty"):
        engine.validate(GenerationRequest(messages=[]))
    audio = Audio(np.zeros(1600, dtype=np.float32), 16000)
    request = _request()
    request.messages[0].content.insert(0, ContentPart(Modality.AUDIO, audio=audio))
    engine.validate(request)


def test_speech_streams_before_the_waveform_is_done(engine):
    """The first audio chunk comes while the talker is still producing codes (chunked code-to-waveform)."""
    events, stamps = [], []

    def emit(event):
        events.append(event)
        stamps.append(time.monotonic())

    started = time.monotonic()
    engine.generate(
        _request(mode=GenerationMode.AUDIO, max_new_tokens=24, min_new_tokens=24), emit, threading.Event()
    )
    chunks = [i for i, e in enumerate(events) if isinstance(e, AudioChunk)]
    assert len(chunks) >= 2
    first_audio = stamps[chunks[0]] - started
    total = stamps[-1] - started
    assert first_audio < total / 2, (first_audio, total)
    assert [events[i].sequence for i in chunks] == list(range(len(chunks)))


def test_auto_device_is_the_cpu_when_no_accelerator_is_present():
    """A CUDA build of torch names CUDA as its accelerator on a machine without a GPU (as on CI); auto must
    then be the CPU, and the accelerator where one is present."""
    import torch

    present = torch.accelerator.is_available()
    expected = torch.accelerator.current_accelerator().type if present else "cpu"
    assert loading.resolve_device("auto").type == expected


@pytest.mark.parametrize(
    ("accelerator", "device", "dtype"),
    [
        (None, "cpu", "float32"),
        ("cuda", "cuda:0", "bfloat16"),
        ("cuda:1", "cuda:1", "bfloat16"),
        ("mps", "mps", "float16"),
        ("xpu", "xpu:0", "bfloat16"),
    ],
)
def test_auto_device_follows_the_machines_accelerator(monkeypatch, accelerator, device, dtype):
    """FakeAccelerator: transformers' accelerator lookup answers as on a CUDA, Apple or Intel machine."""
    import torch

    def fake_accelerator():
        return torch.device(accelerator) if accelerator else None

    monkeypatch.setattr(loading, "get_current_accelerator", fake_accelerator)
    monkeypatch.setattr(loading, "accelerator_available", lambda: accelerator is not None)
    resolved = loading.resolve_device("auto")
    assert resolved == torch.device(device)
    assert loading.resolve_dtype("auto", resolved) == getattr(torch, dtype)
    expected = "sdpa" if resolved.type != "cuda" else loading.resolve_attention("auto", resolved)
    assert loading.resolve_attention("auto", resolved) == expected
