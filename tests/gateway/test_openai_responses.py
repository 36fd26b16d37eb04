"""The core's events as OpenAI's answers and stream chunks (openai_api.responses), with their WAV and image
encoding (openai_api.encoding): pure translation, no servers."""

from __future__ import annotations

import base64
import io
import wave

import numpy as np
import PIL.Image
import pytest
import soundfile

from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate_gateway.openai_api.encoding import image_result, wav_header
from omnigate_gateway.openai_api.requests import ChatOptions, CompletionOptions
from omnigate_gateway.openai_api.responses import (
    ChatStream,
    CompletionStream,
    chat_completion,
    text_completion,
)


def _events(text_parts, pcm_chunks=(), rate=24000, finish=gw.FINISH_REASON_LENGTH):
    events = [gw.GenerateResponse(text=gw.TextDelta(text=t)) for t in text_parts]
    for i, pcm in enumerate(pcm_chunks):
        events.append(
            gw.GenerateResponse(
                audio=gw.AudioChunk(
                    pcm=pcm, sample_rate=rate, channels=1, encoding=gw.AUDIO_ENCODING_PCM_S16LE, sequence=i
                )
            )
        )
    events.append(
        gw.GenerateResponse(
            summary=gw.Summary(finish_reason=finish, prompt_tokens=10, output_tokens=len(text_parts))
        )
    )
    return events


def _tone(n: int, offset: int = 0) -> bytes:
    return (np.sin((np.arange(n) + offset) / 5.0) * 8000).astype("<i2").tobytes()


def test_text_stream_chunks():
    options = ChatOptions(stream=True, include_usage=True, audio_format=None, voice=None)
    stream = ChatStream("chatcmpl-abc", 1700000000, "m", options)
    chunks = [stream.start()] + [c for e in _events(["Hel", "", "lo"]) for c in stream.event(e)]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == [
        "Hel",
        "lo",
    ]  # empty deltas dropped
    assert chunks[3]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert chunks[4]["choices"] == [] and chunks[4]["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
    }
    assert all(c["id"] == "chatcmpl-abc" and c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["usage"] is None for c in chunks[:4])


@pytest.mark.parametrize("fmt", ["wav", "pcm16"])
def test_speech_stream_chunks_concatenate_to_the_audio(fmt):
    options = ChatOptions(stream=True, include_usage=False, audio_format=fmt, voice=None)
    stream = ChatStream("chatcmpl-abc", 1700000000, "m", options)
    pcm = [_tone(1200), _tone(1200, 1200)]
    chunks = [stream.start()] + [c for e in _events(["Hi", " there"], pcm) for c in stream.event(e)]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": None, "refusal": None}
    assert "".join(d["audio"].get("transcript", "") for d in deltas if "audio" in d) == "Hi there"
    assert all("content" not in d for d in deltas[1:])  # speech mode: the text is the audio's transcript
    data = b"".join(base64.b64decode(d["audio"]["data"]) for d in deltas if "data" in d.get("audio", {}))
    assert (
        deltas[-2]["audio"]["expires_at"] > 1700000000
        and chunks[-1]["choices"][0]["finish_reason"] == "length"
    )
    assert {d["audio"]["id"] for d in deltas if "audio" in d} == {"audio_abc"}
    if fmt == "pcm16":
        assert data == b"".join(pcm)
    else:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="int16")
        assert rate == 24000 and samples.tobytes() == b"".join(pcm)


def test_speech_stream_with_no_audio_still_gives_a_wav():
    stream = ChatStream("chatcmpl-x", 1, "m", ChatOptions(True, False, "wav", None))
    chunks = [c for e in _events([]) for c in stream.event(e)]
    data = base64.b64decode(chunks[0]["choices"][0]["delta"]["audio"]["data"])
    with wave.open(io.BytesIO(data)) as w:
        assert w.getnframes() == 0 and w.getframerate() == 24000


def test_non_streamed_completion():
    text = chat_completion(
        "chatcmpl-1",
        5,
        "m",
        ChatOptions(False, False, None, None),
        _events(["a", "b"], finish=gw.FINISH_REASON_STOP_SEQUENCE),
    )
    assert text["object"] == "chat.completion"
    assert text["choices"][0]["message"] == {"role": "assistant", "content": "ab", "refusal": None}
    assert text["choices"][0]["finish_reason"] == "stop"
    assert text["usage"]["total_tokens"] == 12

    pcm = [_tone(500), _tone(700, 500)]
    speech = chat_completion(
        "chatcmpl-1", 5, "m", ChatOptions(False, False, "wav", "Ethan"), _events(["a"], pcm, rate=16000)
    )
    message = speech["choices"][0]["message"]
    assert (
        message["content"] is None
        and message["audio"]["transcript"] == "a"
        and message["audio"]["id"] == "audio_1"
    )
    with wave.open(io.BytesIO(base64.b64decode(message["audio"]["data"]))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (16000, 1, 2, 1200)
        assert w.readframes(1200) == b"".join(pcm)


def test_wav_header_sizes():
    header = wav_header(24000, 1, 100)
    assert len(header) == 44 and header[:4] == b"RIFF" and header[8:16] == b"WAVEfmt "
    assert int.from_bytes(header[4:8], "little") == 136 and int.from_bytes(header[40:44], "little") == 100
    assert wav_header(24000, 1, None)[40:44] == b"\xff\xff\xff\xff"


def test_image_result_converts_only_when_asked():
    png = io.BytesIO()
    PIL.Image.new("RGB", (16, 8), (200, 10, 10)).save(png, format="PNG")
    image = gw.GeneratedImage(data=png.getvalue(), mime_type="image/png", width=16, height=8)
    assert image_result(image, "png", None) == (png.getvalue(), 16, 8)
    data, w, h = image_result(image, "webp", (32, 16))
    assert (w, h) == (32, 16)
    with PIL.Image.open(io.BytesIO(data)) as picture:
        assert picture.format == "WEBP" and picture.size == (32, 16)


def test_continuous_usage_on_every_chunk():
    options = ChatOptions(True, True, None, None, continuous_usage=True)
    stream = ChatStream("chatcmpl-abc", 1, "m", options)
    chunks = [stream.start()] + [c for e in _events(["a", "b", "c"]) for c in stream.event(e)]
    usages = [c["usage"] for c in chunks]
    assert [u["completion_tokens"] for u in usages[:4]] == [0, 1, 2, 3]
    assert usages[1]["prompt_tokens"] is None, "unknown until the worker reports it"
    exact = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    assert usages[4] == exact and chunks[4]["choices"][0]["finish_reason"] == "length"
    assert usages[5] == exact and chunks[5]["choices"] == []


def test_text_completion_chunks_and_answer():
    options = CompletionOptions(stream=True, include_usage=True, echo="Say: ")
    stream = CompletionStream("cmpl-1", 2, "m", options)
    chunks = stream.start() + [c for e in _events(["Hel", "lo"]) for c in stream.event(e)]
    assert [c["choices"][0]["text"] for c in chunks[:4]] == ["Say: ", "Hel", "lo", ""]
    assert all(c["object"] == "text_completion" and c["id"] == "cmpl-1" for c in chunks)
    assert chunks[3]["choices"][0]["finish_reason"] == "length" and chunks[3]["usage"] is None
    assert chunks[4]["choices"] == [] and chunks[4]["usage"]["completion_tokens"] == 2
    answer = text_completion("cmpl-1", 2, "m", options, _events(["Hel", "lo"]))
    assert answer["choices"][0] == {
        "index": 0,
        "text": "Say: Hello",
        "logprobs": None,
        "finish_reason": "length",
    }
    assert answer["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
