"""``/v1/audio/speech`` and ``/v1/audio/transcriptions`` bodies as the gateway's public GenerateRequest
(openai_api.requests), the transcription answers (openai_api.responses) and the speech encodings
(openai_api.encoding.SpeechEncoder): pure translation, no servers. The routes themselves are tested in
tests/gateway/test_openai_audio_routes.py and against the real stack in tests/integration/test_openai_audio.py.
"""

from __future__ import annotations

import io
import wave

import av
import numpy as np
import pydantic
import pytest
import soundfile

from omnigate.conversation import Modality, ModelInfo
from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate_gateway.openai_api.encoding import SPEECH_ENCODINGS, SpeechEncoder
from omnigate_gateway.openai_api.errors import InvalidParam, validation_error
from omnigate_gateway.openai_api.protocol import SPEECH_OUTPUT_FORMATS, SpeechRequest
from omnigate_gateway.openai_api.requests import (
    SPEECH_PROMPT,
    TRANSCRIPTION_PROMPT,
    speech_request,
    transcription_fields,
    transcription_request,
)
from omnigate_gateway.openai_api.responses import TranscriptionStream, transcription
from tests.support.fake_workers import SPEAKING_MODEL, TEXT_MODEL

RATE = 24000


def speech(info: ModelInfo | None = SPEAKING_MODEL, **body) -> tuple[gw.GenerateRequest, str]:
    body.setdefault("input", "Hello there.")
    return speech_request(SpeechRequest.model_validate(body), info)


def speech_refusal(info: ModelInfo | None = SPEAKING_MODEL, **body) -> InvalidParam:
    try:
        speech(info, **body)
    except pydantic.ValidationError as e:
        return validation_error(e.errors())
    except InvalidParam as e:
        return e
    raise AssertionError(f"{body} was accepted")


def transcribe(fields: dict, audio: bytes = b"RIFF-audio", info: ModelInfo | None = SPEAKING_MODEL):
    pairs = []
    for name, value in fields.items():
        pairs.extend((name, v) for v in value) if isinstance(value, list) else pairs.append((name, value))
    return transcription_request(transcription_fields(pairs), audio, info)


def transcription_refusal(fields: dict, audio: bytes = b"RIFF-audio", info=SPEAKING_MODEL) -> InvalidParam:
    with pytest.raises(InvalidParam) as err:
        transcribe(fields, audio, info)
    return err.value


# ---- speech --------------------------------------------------------------------------------------------


def test_speech_is_one_user_message_in_audio_mode_asking_to_say_the_input():
    request, response_format = speech(voice="ethan", response_format="wav")
    assert response_format == "wav"
    assert request.generation_mode == gw.GENERATION_MODE_AUDIO
    assert request.speaker == "Ethan", "the voice is the model's speaker, matched case-insensitively"
    [message] = request.messages
    assert message.role == "user"
    assert message.content[0].text == f"{SPEECH_PROMPT}\n\nHello there."
    assert request.parameters.max_new_tokens == 0, "0: the gateway's default length applies"


def test_speech_defaults_to_mp3_and_the_models_voice_and_takes_instructions_and_extensions():
    request, response_format = speech(
        instructions="  Cheerfully. ", max_new_tokens=40, seed=-1, voice={"id": "Chelsie"}, speed=1.0
    )
    assert response_format == "mp3", "OpenAI's default format"
    assert request.speaker == "Chelsie"
    text = request.messages[0].content[0].text
    assert text == f"{SPEECH_PROMPT}\nHow to say it: Cheerfully.\n\nHello there."
    assert request.parameters.max_new_tokens == 40 and request.parameters.seed == 2**64 - 1
    assert speech(voice=None)[0].speaker == "", "no voice: the model's default speaker"


def test_a_model_without_voice_names_takes_any_voice_as_its_default():
    nameless = ModelInfo("fake/tts", "FakeTTS", [Modality.TEXT], [Modality.AUDIO])
    assert speech(nameless, voice="alloy")[0].speaker == ""


def test_speech_without_a_ready_worker_is_left_to_the_core():
    request, _ = speech(None, voice="anyone")  # the core answers 503
    assert request.speaker == ""


@pytest.mark.parametrize(
    ("body", "info", "param", "words"),
    [
        ({"voice": "alloy"}, SPEAKING_MODEL, "voice", "use one of Chelsie, Ethan"),
        ({"voice": {"id": "nova"}}, SPEAKING_MODEL, "voice.id", "use one of Chelsie, Ethan"),
        ({"voice": "Chelsie"}, TEXT_MODEL, "model", "cannot generate speech"),
        ({"response_format": "ogg"}, SPEAKING_MODEL, "response_format", "mp3, opus, aac, flac, wav, pcm"),
        ({"speed": 1.5}, SPEAKING_MODEL, "speed", "must be 1.0"),
        ({"stream_format": "sse"}, SPEAKING_MODEL, "stream_format", 'use "audio"'),
        ({"input": "  "}, SPEAKING_MODEL, "input", "empty"),
        ({"input": "a" * 4097}, SPEAKING_MODEL, "input", "4097 characters; the limit is 4096"),
        ({"max_new_tokens": 513}, SPEAKING_MODEL, "max_new_tokens", "between 1 and 512"),
        ({"max_new_tokens": 0}, SPEAKING_MODEL, "max_new_tokens", "between 1 and 512"),
        ({"voices": "Chelsie"}, SPEAKING_MODEL, "voices", "Unrecognized request argument"),
        ({"input": None}, SPEAKING_MODEL, "input", ""),
    ],
)
def test_speech_refusals_name_the_parameter(body, info, param, words):
    error = speech_refusal(info, **body)
    assert error.param == param and words in error.message, error.message


# ---- transcription -------------------------------------------------------------------------------------


def test_transcription_is_the_audio_and_the_instruction_in_text_mode():
    request, options = transcribe({"model": "whisper-1"}, b"RIFF-audio")
    assert (options.response_format, options.stream) == ("json", False)
    assert request.generation_mode == gw.GENERATION_MODE_TEXT
    [message] = request.messages
    audio, instruction = message.content
    assert audio.audio.inline.data == b"RIFF-audio", "sent as inline audio: the media path decodes it"
    assert instruction.text == TRANSCRIPTION_PROMPT
    assert not request.parameters.do_sample, "greedy by default"


def test_transcription_fields_are_form_strings_read_as_their_types():
    request, options = transcribe(
        {
            "language": "de",
            "prompt": "Omnigate, gRPC.",
            "response_format": "text",
            "temperature": "0.3",
            "stream": "true",
            "max_new_tokens": "24",
            "include[]": [],
        }
    )
    assert (options.response_format, options.stream) == ("text", True)
    text = request.messages[0].content[1].text
    assert text == (
        f"{TRANSCRIPTION_PROMPT} The speech is in the language whose ISO-639-1 code is de.\n"
        "Text that may come just before this audio (follow its spelling and style): Omnigate, gRPC."
    )
    p = request.parameters
    assert p.do_sample and p.temperature == pytest.approx(0.3) and p.max_new_tokens == 24
    assert not transcribe({"temperature": "0"})[0].parameters.do_sample


@pytest.mark.parametrize(
    ("fields", "info", "audio", "param", "words"),
    [
        ({"response_format": "srt"}, SPEAKING_MODEL, b"x", "response_format", "no timestamps"),
        (
            {"response_format": "verbose_json"},
            SPEAKING_MODEL,
            b"x",
            "response_format",
            "use one of json, text",
        ),
        ({"response_format": "xml"}, SPEAKING_MODEL, b"x", "response_format", "use one of json, text"),
        ({"include[]": ["logprobs"]}, SPEAKING_MODEL, b"x", "include", "not supported"),
        ({"timestamp_granularities[]": ["word"]}, SPEAKING_MODEL, b"x", "timestamp_granularities", ""),
        ({"chunking_strategy": "auto"}, SPEAKING_MODEL, b"x", "chunking_strategy", "not supported"),
        ({"language": "English!"}, SPEAKING_MODEL, b"x", "language", "ISO-639-1"),
        ({"temperature": "1.5"}, SPEAKING_MODEL, b"x", "temperature", "between 1e-05 and 1"),
        ({"temperature": "warm"}, SPEAKING_MODEL, b"x", "temperature", "number"),
        ({"stream": "maybe"}, SPEAKING_MODEL, b"x", "stream", "boolean"),
        ({"max_new_tokens": "600"}, SPEAKING_MODEL, b"x", "max_new_tokens", "between 1 and 512"),
        ({"speaker": "x"}, SPEAKING_MODEL, b"x", "speaker", "Unrecognized request argument"),
        ({}, SPEAKING_MODEL, b"", "file", "empty"),
        ({}, TEXT_MODEL, b"x", "model", "cannot take audio input"),
    ],
)
def test_transcription_refusals_name_the_field(fields, info, audio, param, words):
    error = transcription_refusal(fields, audio, info)
    assert error.param == param and words in error.message, error.message


def test_a_repeated_field_is_refused_as_a_list():
    error = transcription_refusal({"language": ["en", "de"]})
    assert error.param == "language"


def _text(delta: str) -> gw.GenerateResponse:
    return gw.GenerateResponse(text=gw.TextDelta(text=delta))


def _summary() -> gw.GenerateResponse:
    return gw.GenerateResponse(summary=gw.Summary(prompt_tokens=30, output_tokens=2))


def test_transcription_answers_json_with_token_usage():
    answer = transcription([_text("Hello"), _text(" world"), _summary()])
    assert answer == {
        "text": "Hello world",
        "usage": {"type": "tokens", "input_tokens": 30, "output_tokens": 2, "total_tokens": 32},
    }


def test_transcription_stream_is_deltas_then_done():
    stream = TranscriptionStream()
    events = [
        *stream.start(),
        *stream.event(_text("Hello")),
        *stream.event(_text("")),
        *stream.event(_text(" world")),
        *stream.event(_summary()),
    ]
    assert [e["type"] for e in events] == ["transcript.text.delta"] * 2 + ["transcript.text.done"]
    assert [e["delta"] for e in events[:2]] == ["Hello", " world"]
    assert events[-1]["text"] == "Hello world" and events[-1]["usage"]["total_tokens"] == 32


# ---- speech encodings ----------------------------------------------------------------------------------


def _tone(seconds: float, rate: int = RATE) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes()


def _encode(response_format: str, pcm: bytes, chunk_bytes: int = 9600, rate: int = RATE) -> list[bytes]:
    encoder = SpeechEncoder(response_format, RATE)
    pieces = [encoder.encode(pcm[i : i + chunk_bytes], rate, 1) for i in range(0, len(pcm), chunk_bytes)]
    return [*pieces, encoder.finish()]


def _decoded(response_format: str, data: bytes) -> tuple[int, np.ndarray]:
    """(sample rate, mono float samples) as PyAV (FFmpeg) decodes the file."""
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray().astype(np.float32).reshape(-1) for f in container.decode(audio=0)]
        rate = container.streams.audio[0].rate
    samples = np.concatenate(frames)
    return rate, samples / 32768 if np.abs(samples).max() > 2 else samples


def test_every_openai_format_has_an_encoding():
    assert set(SPEECH_ENCODINGS) == set(SPEECH_OUTPUT_FORMATS)


def test_pcm_is_the_samples_as_they_come_and_wav_adds_a_streaming_header():
    pcm = _tone(0.5)
    assert b"".join(_encode("pcm", pcm)) == pcm
    pieces = _encode("wav", pcm)
    assert pieces[0].startswith(b"RIFF") and pieces[0][44:] == pcm[:9600]
    with wave.open(io.BytesIO(b"".join(pieces))) as w:
        assert (w.getframerate(), w.getnchannels(), w.readframes(10**6)) == (RATE, 1, pcm)


@pytest.mark.parametrize("response_format", ["mp3", "opus", "aac"])
def test_compressed_formats_are_sent_as_they_are_encoded(response_format):
    pieces = _encode(response_format, _tone(2.0))
    assert sum(1 for p in pieces[:-1] if p) >= 5, "bytes leave with most chunks, not only at the end"
    rate, samples = _decoded(response_format, b"".join(pieces))
    assert rate == (48000 if response_format == "opus" else RATE)  # Opus always decodes at 48 kHz
    assert len(samples) >= 1.9 * rate and np.sqrt(np.mean(samples**2)) > 0.1


def test_flac_is_sent_whole_with_its_length_and_reads_back_exactly():
    pcm = _tone(1.0)
    pieces = _encode("flac", pcm)
    assert not any(pieces[:-1]), "FLAC waits for the end: its header holds the length"
    samples, rate = soundfile.read(io.BytesIO(pieces[-1]), dtype="int16")
    assert rate == RATE and samples.tobytes() == pcm


def test_mp3_at_a_rate_mp3_lacks_is_resampled_to_one_it_has():
    pieces = _encode("mp3", _tone(1.0, 17000), rate=17000)
    rate, samples = _decoded("mp3", b"".join(pieces))
    assert rate == 22050 and len(samples) > 0.9 * rate


@pytest.mark.parametrize("response_format", ["wav", "pcm", "mp3", "flac"])
def test_no_speech_at_all_is_an_empty_file(response_format):
    data = SpeechEncoder(response_format, RATE).finish()
    if response_format == "wav":
        with wave.open(io.BytesIO(data)) as w:
            assert w.getnframes() == 0 and w.getframerate() == RATE
    elif response_format == "flac":  # a header and no frames (FLAC's length 0 reads as "unknown")
        with av.open(io.BytesIO(data)) as container:
            assert data.startswith(b"fLaC") and not list(container.decode(audio=0))
    else:
        assert data == b""
