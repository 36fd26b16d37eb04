"""``/v1/audio/speech`` and ``/v1/audio/transcriptions`` with the unmodified ``openai`` SDK against the real
gateway and worker processes: the tiny Qwen2.5-Omni speaks (24 kHz) and hears, the tiny Qwen2-Audio only
hears (so it cannot speak), and the tiny Janus cannot hear. The tiny models' words are random: the tests
check what a client gets (decodable, non-silent 24 kHz audio, streamed in pieces; a transcript and its
usage), not what is said.
"""

from __future__ import annotations

import io
import wave

import av
import httpx
import numpy as np
import openai
import pytest
import soundfile

from tests.support import media_factory
from tests.support.stack import Stack

pytestmark = pytest.mark.slow

RATE = 24000  # Qwen2.5-Omni's speech
# The talker samples its speech codes; a seed makes the tiny talker's length reproducible (and long enough).
SHORT = {"seed": 7, "max_new_tokens": 6}


def _sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{stack.gateway.http_port}/v1",
        api_key="unused",
        max_retries=0,
        timeout=120,
    )


@pytest.fixture(scope="module")
def sdk(omni_stack) -> openai.OpenAI:
    return _sdk(omni_stack)


@pytest.fixture(scope="module")
def model(sdk) -> str:
    return sdk.models.list().data[0].id


def _rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))


def _speak(sdk: openai.OpenAI, model: str, response_format: str, **kwargs) -> bytes:
    reply = sdk.audio.speech.create(
        model=model,
        voice="Ethan",
        input="Hello there.",
        response_format=response_format,  # type: ignore[arg-type]
        extra_body=SHORT,
        **kwargs,
    )
    return reply.content


@pytest.mark.parametrize("response_format", ["wav", "mp3", "flac"])
def test_speech_decodes_to_non_silent_24_khz_audio(sdk, model, response_format):
    data = _speak(sdk, model, response_format)
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert rate == RATE and len(samples) > 0.1 * RATE, (rate, len(samples))
    assert _rms(samples) > 1e-3, "the speech is not silent"


def test_speech_as_raw_pcm_and_in_opus_and_aac(sdk, model):
    pcm = _speak(sdk, model, "pcm", instructions="Slowly.")
    assert len(pcm) % 2 == 0 and not pcm.startswith(b"RIFF") and len(pcm) > 0.1 * RATE * 2
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    assert _rms(samples) > 1e-3
    for response_format, decoded_rate in (("opus", 48000), ("aac", RATE)):  # Opus decodes at 48 kHz
        with av.open(io.BytesIO(_speak(sdk, model, response_format))) as container:
            frames = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
            assert container.streams.audio[0].rate == decoded_rate
        decoded = np.concatenate(frames)
        assert len(decoded) > 0.1 * decoded_rate and _rms(decoded) > 1e-3, response_format


def test_streamed_speech_arrives_in_pieces_with_chunked_transfer(sdk, model):
    with sdk.audio.speech.with_streaming_response.create(
        model=model, voice="Chelsie", input="Hello there.", response_format="wav", extra_body=SHORT
    ) as response:
        assert response.headers["content-type"] == "audio/wav"
        assert response.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in response.headers
        pieces = [piece for piece in response.iter_bytes() if piece]
    assert len(pieces) >= 2, "the audio is sent as it is generated, chunk by chunk"
    assert pieces[0].startswith(b"RIFF") and len(pieces[0]) < len(b"".join(pieces))
    with wave.open(io.BytesIO(b"".join(pieces))) as w:  # the header of a stream of unknown length
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (RATE, 2, 1)
        assert w.getnframes() > 0.1 * RATE


def test_speech_refusals_are_400(sdk, model, qwen2_audio_stack):
    cases = [
        ({"voice": "alloy"}, "voice", "Chelsie"),
        ({"response_format": "ogg"}, "response_format", "mp3, opus, aac, flac, wav, pcm"),
        ({"speed": 1.25}, "speed", "1.0"),
    ]
    for fields, param, words in cases:
        with pytest.raises(openai.BadRequestError) as err:
            sdk.audio.speech.create(**{"model": model, "voice": "Ethan", "input": "Hi.", **fields})
        assert err.value.body["param"] == param and words in err.value.message, err.value.message
    hearing = _sdk(qwen2_audio_stack)
    with pytest.raises(openai.BadRequestError) as err:
        hearing.audio.speech.create(model="tiny-qwen2-audio", voice="Ethan", input="Hi.")
    assert "cannot generate speech" in err.value.message


def _wav() -> tuple[str, bytes, str]:
    return ("speech.wav", media_factory.make_wav(seconds=1.0), "audio/wav")


def test_transcription_json_and_text(qwen2_audio_stack):
    sdk = _sdk(qwen2_audio_stack)
    reply = sdk.audio.transcriptions.create(
        model="tiny-qwen2-audio", file=_wav(), language="en", extra_body={"max_new_tokens": 8}
    )
    assert isinstance(reply.text, str) and reply.text
    assert reply.usage is not None and reply.usage.type == "tokens"
    assert 1 <= reply.usage.output_tokens <= 8 and reply.usage.input_tokens > 20, "the audio is in the prompt"
    text = sdk.audio.transcriptions.create(
        model="tiny-qwen2-audio", file=_wav(), language="en", response_format="text",
        extra_body={"max_new_tokens": 8},
    )  # fmt: skip
    assert text == reply.text, "greedy: the same transcript, as plain text"


def test_streamed_transcription_is_delta_events_then_done(qwen2_audio_stack):
    events = list(
        _sdk(qwen2_audio_stack).audio.transcriptions.create(
            model="tiny-qwen2-audio", file=_wav(), stream=True, extra_body={"max_new_tokens": 8}
        )
    )
    assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1) and len(events) >= 2
    done = events[-1]
    assert done.type == "transcript.text.done"
    assert done.text == "".join(e.delta for e in events[:-1]) and done.usage.output_tokens >= 1


def test_transcription_on_the_omni_model_too(sdk, model):
    reply = sdk.audio.transcriptions.create(model=model, file=_wav(), extra_body={"max_new_tokens": 4})
    assert reply.usage.output_tokens >= 1


def test_transcription_refusals_are_400(qwen2_audio_stack, janus_stack):
    sdk = _sdk(qwen2_audio_stack)
    for fields, param in (
        ({"response_format": "srt"}, "response_format"),
        ({"timestamp_granularities": ["word"]}, "timestamp_granularities"),
        ({"temperature": 3}, "temperature"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            sdk.audio.transcriptions.create(model="tiny-qwen2-audio", file=_wav(), **fields)
        assert err.value.body["param"] == param, err.value.body
    with pytest.raises(openai.BadRequestError) as err:
        sdk.audio.transcriptions.create(
            model="tiny-qwen2-audio", file=("notes.txt", b"not audio at all", "text/plain")
        )
    assert "audio" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        _sdk(janus_stack).audio.transcriptions.create(model="tiny-janus", file=_wav())
    assert "cannot take audio input" in err.value.message
    raw = httpx.post(
        f"http://127.0.0.1:{qwen2_audio_stack.gateway.http_port}/v1/audio/transcriptions",
        json={"model": "tiny-qwen2-audio"},
    )
    assert raw.status_code == 400 and "multipart/form-data" in raw.json()["error"]["message"]
