"""With greedy decoding, the service's text equals transformers' own ``pipeline("any-to-any")``.

Both sides get the same decoded inputs: the test decodes the media bytes with the gateway's decoders and
hands the arrays to the pipeline, while the service fetches the same bytes over HTTP and decodes them
itself. Processor keyword arguments are written out here (not imported from the worker) so that a change
in what the worker passes shows up as a failure.
"""

from __future__ import annotations

import media_factory
import PIL.Image
import pytest
from stack import MODELS_DIR
from transformers import pipeline

from omnigate.media import DecodeLimits
from omnigate_gateway import decode

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 12
OMNI = MODELS_DIR / "tiny-qwen2.5-omni"
# Qwen2.5-Omni ignores max_new_tokens (transformers 5.23): the limit goes to the thinker, and text mode
# keeps the talker from running.
OMNI_GENERATE = {
    "generation_mode": "text",
    "thinker_max_new_tokens": MAX_NEW_TOKENS,
    "thinker_do_sample": False,
}


@pytest.fixture(scope="module")
def omni_pipeline():
    return pipeline("any-to-any", model=str(OMNI))


@pytest.fixture(scope="module")
def media(media_server):
    files = {
        "image": media_factory.make_jpeg(96, 64),
        "audio": media_factory.make_mp3(seconds=2.0, rate=44100, channels=2, freq=330.0),
        "video": media_factory.make_mp4(seconds=4.0, fps=10, w=64, h=48, with_audio=True),
    }
    urls = {kind: media_server.serve(f"/equivalence/{kind}", data) for kind, data in files.items()}
    limits = DecodeLimits()
    decoded = {
        "image": decode.decode_image(files["image"], limits),
        "audio": decode.decode_audio(files["audio"], 16000, limits),
        "video": decode.decode_video(files["video"], 1.0, True, 16000, limits),
    }
    return urls, decoded


def _service_text(stack, content, **kwargs) -> str:
    with stack.client() as client:
        result = client.generate_all(
            [{"role": "user", "content": content}], max_new_tokens=MAX_NEW_TOKENS, **kwargs
        )
    return result.text


def _video_kwargs(pipe, fps: float) -> dict:
    return {"fps": fps, "do_sample_frames": False, "size": dict(pipe.processor.video_processor.size)}


def test_text_only(omni_stack, omni_pipeline):
    content = [{"type": "text", "text": "Tell me a story."}]
    expected = omni_pipeline(
        text=[{"role": "user", "content": content}],
        return_full_text=False,
        generate_kwargs=dict(OMNI_GENERATE),
    )[0]["generated_text"]
    assert expected
    assert _service_text(omni_stack, content) == expected


def test_text_and_image(omni_stack, omni_pipeline, media):
    urls, decoded = media
    image = PIL.Image.fromarray(decoded["image"].pixels)
    question = {"type": "text", "text": "What is in this picture?"}
    expected = omni_pipeline(
        text=[{"role": "user", "content": [{"type": "image", "image": image}, question]}],
        return_full_text=False,
        generate_kwargs=dict(OMNI_GENERATE),
    )[0]["generated_text"]
    assert expected
    assert _service_text(omni_stack, [{"type": "image", "url": urls["image"]}, question]) == expected


def test_text_and_audio(omni_stack, omni_pipeline, media):
    urls, decoded = media
    question = {"type": "text", "text": "What do you hear in this audio?"}
    expected = omni_pipeline(
        text=[{"role": "user", "content": [{"type": "audio", "audio": decoded["audio"].samples}, question]}],
        return_full_text=False,
        generate_kwargs=dict(OMNI_GENERATE),
    )[0]["generated_text"]
    assert expected
    assert _service_text(omni_stack, [{"type": "audio", "url": urls["audio"]}, question]) == expected


def test_text_and_video_at_one_fps(omni_stack, omni_pipeline, media):
    urls, decoded = media
    video = decoded["video"]
    assert video.num_frames == 4 and video.sampled_fps == 1.0
    question = {"type": "text", "text": "Describe this video."}
    expected = omni_pipeline(
        text=[{"role": "user", "content": [{"type": "video", "video": video.frames}, question]}],
        return_full_text=False,
        generate_kwargs=dict(OMNI_GENERATE),
        processor_kwargs=_video_kwargs(omni_pipeline, 1.0),
    )[0]["generated_text"]
    assert expected
    assert _service_text(omni_stack, [{"type": "video", "url": urls["video"]}, question], fps=1) == expected


def test_video_with_its_audio_track(omni_stack, omni_pipeline, media):
    """The pipeline's chat path can only read a video's audio track from a file with torchcodec, which
    does not load on these machines; so the pipeline gets the chat template's prompt with the decoded
    frames and track (``audio_from_video_indices``), the path transformers documents for callers that
    decode the track themselves."""
    urls, decoded = media
    video = decoded["video"]
    question = {"type": "text", "text": "Describe this video."}
    prompt = omni_pipeline.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, question]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    expected = omni_pipeline(
        text=prompt,
        videos=[video.frames],
        audio=[video.audio.samples],
        return_full_text=False,
        load_audio_from_video=True,
        generate_kwargs={**OMNI_GENERATE, "use_audio_in_video": True},
        processor_kwargs={
            **_video_kwargs(omni_pipeline, 1.0),
            "load_audio_from_video": True,
            "audio_from_video_indices": [0],
            "sampling_rate": 16000,
        },
    )[0]["generated_text"]
    got = _service_text(
        omni_stack, [{"type": "video", "url": urls["video"]}, question], fps=1, load_audio_from_video=True
    )
    assert expected
    assert got == expected
    # The track really reaches the model: its audio tokens are interleaved into the prompt.
    with omni_stack.client() as client:
        with_track = client.generate_all(
            [{"role": "user", "content": [{"type": "video", "url": urls["video"]}, question]}],
            max_new_tokens=1,
            fps=1,
            load_audio_from_video=True,
        ).summary.prompt_tokens
        frames_only = client.generate_all(
            [{"role": "user", "content": [{"type": "video", "url": urls["video"]}, question]}],
            max_new_tokens=1,
            fps=1,
        ).summary.prompt_tokens
    assert with_track > frames_only
