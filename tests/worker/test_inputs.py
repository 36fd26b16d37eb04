"""Processor inputs: content the model's processor (or its audio encoder) cannot take is refused as the
caller's mistake (InvalidInput, a short message), never raised as an internal error."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoProcessor

from omnigate.conversation import ContentPart, GenerationRequest, Message, Modality
from omnigate.errors import ErrorCode, InvalidInput
from omnigate.media import Audio, Image, Video
from omnigate_worker.engine import inputs
from tests.support.stack import MODELS_DIR

MESSAGE_LIMIT = 400


@pytest.fixture(scope="module")
def processor():
    """The tiny Qwen2.5-Omni's processor (Qwen2-VL image and video processors, Whisper features)."""
    return AutoProcessor.from_pretrained(MODELS_DIR / "tiny-qwen2.5-omni")


def _request(*parts: ContentPart, use_audio_in_video: bool = False) -> GenerationRequest:
    content = [*parts, ContentPart(Modality.TEXT, text="What is this?")]
    return GenerationRequest(messages=[Message("user", content)], use_audio_in_video=use_audio_in_video)


def _video(frames: np.ndarray, audio: Audio | None = None) -> ContentPart:
    n = len(frames)
    video = Video(frames, [i / 2 for i in range(n)], 2.0, 2.0, n / 2, n, audio)
    return ContentPart(Modality.VIDEO, video=video)


def _refused(processor, request: GenerationRequest) -> str:
    with pytest.raises(InvalidInput) as info:
        inputs.build(processor, request)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    message = str(info.value)
    assert 0 < len(message) < MESSAGE_LIMIT
    return message


@pytest.mark.parametrize(("height", "width"), [(1, 400), (300, 1), (2, 500)])
def test_image_the_processor_refuses_is_invalid_input(processor, height, width):
    image = Image(np.zeros((height, width, 3), np.uint8))
    message = _refused(processor, _request(ContentPart(Modality.IMAGE, image=image)))
    assert message.startswith("the model's processor refused the request's image: absolute aspect ratio")


def test_video_frames_the_processor_refuses_are_invalid_input(processor):
    message = _refused(processor, _request(_video(np.zeros((2, 201, 1, 3), np.uint8))))
    assert message.startswith("the model's processor refused the request's video:")


@pytest.mark.parametrize(("height", "width"), [(1, 150), (3, 5), (1, 3), (3, 3)])
def test_frames_one_or_three_pixels_high_are_read_as_height_width_channels(processor, height, width):
    frames = np.zeros((2, height, width, 3), np.uint8)
    frames[..., 0] = 255  # red
    features, _ = inputs.build(processor, _request(_video(frames)))
    _, grid_h, grid_w = features["video_grid_thw"][0].tolist()
    if width > height:
        assert grid_w > grid_h  # landscape stays landscape (read as channels-first it turned portrait)
    mean = processor.video_processor.image_mean
    std = processor.video_processor.image_std
    patches = features["pixel_values_videos"].reshape(-1, 3, 2, 14, 14)  # (channel, time, patch, patch)
    red = [(1.0 - mean[0]) / std[0], (0.0 - mean[1]) / std[1], (0.0 - mean[2]) / std[2]]
    for channel, value in enumerate(red):
        assert float(patches[:, channel].mean()) == pytest.approx(value, abs=0.02)


@pytest.mark.parametrize("samples", [0, 1, 2, 800, 1599])
def test_audio_too_short_for_the_encoders_is_refused(processor, samples):
    audio = Audio(np.zeros(samples, np.float32), 16000)
    message = _refused(processor, _request(ContentPart(Modality.AUDIO, audio=audio)))
    assert message.startswith("an audio part of message 0 is ") and message.endswith("the minimum is 0.1 s")
    if samples:
        assert f"({samples} sample{'s' if samples > 1 else ''} at 16000 Hz)" in message


def test_audio_of_the_minimum_length_is_taken(processor):
    audio = Audio(np.zeros(1600, np.float32), 16000)
    features, _ = inputs.build(processor, _request(ContentPart(Modality.AUDIO, audio=audio)))
    assert "input_features" in features


def test_a_too_short_audio_track_of_a_video_is_refused(processor):
    track = Audio(np.zeros(100, np.float32), 16000)
    message = _refused(
        processor, _request(_video(np.zeros((2, 28, 28, 3), np.uint8), track), use_audio_in_video=True)
    )
    assert message == (
        "the audio track of a video of message 0 is 6.25 ms long (100 samples at 16000 Hz); the minimum is 0.1 s"
    )


@pytest.mark.parametrize("text", ["a\ud800b", "\udfff", "ok " * 1000 + "\ud83d"])
def test_text_with_a_lone_surrogate_is_refused(processor, text):
    request = GenerationRequest(messages=[Message("user", [ContentPart(Modality.TEXT, text=text)])])
    message = _refused(processor, request)
    assert (
        "the text of message 0 contains an unpaired UTF-16 surrogate" in message
        and "valid Unicode" in message
    )


class FakeProcessor:
    """A FAKE processor (test double): its template and call raise what a test gives it."""

    def __init__(self, template_error: Exception | None = None, call_error: Exception | None = None) -> None:
        self.template_error = template_error
        self.call_error = call_error

    def apply_chat_template(self, messages, **kwargs) -> str:
        if self.template_error is not None:
            raise self.template_error
        return "prompt"

    def __call__(self, **kwargs):
        raise self.call_error


def test_library_reasons_are_cut_short():
    request = _request()
    message = _refused(FakeProcessor(template_error=ValueError("role " + "x" * 100_000)), request)
    assert message.startswith("the model's chat template rejected the conversation: role xxx")
    assert message.endswith("... (100005 characters)")
    message = _refused(FakeProcessor(call_error=ValueError("bad\n" * 50_000)), request)
    assert message.startswith("the model's processor refused the request's text: bad bad")


@pytest.mark.parametrize("error", [KeyError("input_ids"), AttributeError("x"), RuntimeError("CUDA error")])
def test_other_processor_failures_stay_internal(error):
    with pytest.raises(type(error)):
        inputs.build(FakeProcessor(call_error=error), _request())
