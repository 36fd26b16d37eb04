"""End to end: the real gateway and worker processes, media served over HTTP on loopback."""

from __future__ import annotations

import io
import wave

import numpy as np
import PIL.Image
import pytest

from omnigate_client import AudioChunk, Summary, TextDelta, media_part
from tests.support import media_factory

pytestmark = pytest.mark.slow

QUESTION = "What do you hear in this audio?"


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _wav_samples(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
        frames = w.readframes(w.getnframes())
        return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0, w.getframerate()


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_audio_url_streams_text(omni_stack, media_server, fmt):
    maker = {"wav": media_factory.make_wav, "flac": media_factory.make_flac, "mp3": media_factory.make_mp3}[
        fmt
    ]
    url = media_server.serve(f"/sound.{fmt}", maker(seconds=1.5, rate=44100, channels=2))
    with omni_stack.client() as client:
        events = list(
            client.generate(_user({"type": "audio", "url": url}, _text(QUESTION)), max_new_tokens=20)
        )
    deltas = [e for e in events if isinstance(e, TextDelta)]
    summary = events[-1]
    assert isinstance(summary, Summary), "the stream ends with a summary"
    assert len(deltas) >= 2, "text arrives as several deltas, not one block"
    assert "".join(d.text for d in deltas).strip()
    assert 1 <= summary.output_tokens <= 20
    assert summary.finish_reason in {"stop", "length"}
    assert summary.prompt_tokens > 20  # the audio's placeholder tokens are part of the prompt
    assert summary.model_id.endswith("tiny-qwen2.5-omni")
    assert summary.timings["total_s"] >= summary.timings["media_s"] > 0


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_image_url_streams_text(omni_stack, media_server, fmt):
    data = media_factory.make_png(64, 48) if fmt == "png" else media_factory.make_jpeg(64, 48)
    url = media_server.serve(f"/picture.{fmt}", data)
    with omni_stack.client() as client:
        result = client.generate_all(
            _user({"type": "image", "url": url}, _text("Describe this image.")), max_new_tokens=8
        )
    assert result.text.strip()
    assert result.summary.output_tokens <= 8


def test_inline_local_path_is_sent_by_the_client(omni_stack, tmp_path):
    path = tmp_path / "sound.wav"
    path.write_bytes(media_factory.make_wav(seconds=1.0))
    with omni_stack.client() as client:
        result = client.generate_all(_user(media_part("audio", path), _text(QUESTION)), max_new_tokens=5)
    assert result.summary.output_tokens <= 5 and result.text


def test_video_with_audio_track_answered_with_speech(omni_stack, media_server):
    url = media_server.serve(
        "/clip.mp4", media_factory.make_mp4(seconds=3.0, fps=10, w=64, h=48, with_audio=True)
    )
    with omni_stack.client() as client:
        info = client.model_info()
        result = client.generate_all(
            _user({"type": "video", "url": url}, _text("Describe this video.")),
            generation_mode="audio",
            fps=1,
            load_audio_from_video=True,
            max_new_tokens=8,
        )
    assert result.audio, "speech arrives as audio chunks"
    assert [c.sequence for c in result.audio] == list(range(len(result.audio)))
    samples, rate = _wav_samples(result.wav_bytes())
    assert rate == info["output_audio_sample_rate"] == 24000
    assert len(samples) / rate == pytest.approx(result.summary.audio_seconds, abs=0.01)
    assert np.sqrt(np.mean(samples**2)) > 1e-3, "the speech is not silent"
    assert result.summary.prompt_tokens > 30


def test_speaker_choice_and_unknown_speaker(omni_stack):
    import grpc

    with omni_stack.client() as client:
        speakers = client.model_info()["speakers"]
        assert "Ethan" in speakers
        result = client.generate_all(
            _user(_text("Hi")), generation_mode="audio", speaker="Ethan", max_new_tokens=3
        )
        assert isinstance(result.audio[0], AudioChunk)
        with pytest.raises(grpc.RpcError) as err:
            client.generate_all(
                _user(_text("Hi")), generation_mode="audio", speaker="Nobody", max_new_tokens=3
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Nobody" in err.value.details() and "Ethan" in err.value.details()


def test_stop_sequence_and_full_text(omni_stack):
    with omni_stack.client() as client:
        plain = client.generate_all(_user(_text("Count")), max_new_tokens=12)
        full = client.generate_all(_user(_text("Count")), max_new_tokens=12, return_full_text=True)
        assert full.text.endswith(plain.text) and "Count" in full.text[: -len(plain.text) or None]
        stop = plain.text.strip()[2:4]
        if stop:
            cut = client.generate_all(_user(_text("Count")), max_new_tokens=12, stop=[stop])
            assert cut.summary.finish_reason == "stop_sequence"
            assert stop not in cut.text
            assert plain.text.startswith(cut.text)


def test_image_output_from_janus(janus_stack):
    with janus_stack.client() as client:
        assert "image" in client.model_info()["output_modalities"]
        result = client.generate_all(_user(_text("A red square")), generation_mode="image")
    assert len(result.images) == 1
    image = result.images[0]
    assert image.mime_type == "image/png"
    decoded = PIL.Image.open(io.BytesIO(image.data))
    decoded.verify()
    assert decoded.size == (image.width, image.height) and image.width > 0
