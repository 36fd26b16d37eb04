"""With greedy decoding, the service's text equals transformers' own ``pipeline("any-to-any")``, and what
reaches the model's audio and vision encoders is the same on both sides.

Both sides get the same decoded inputs: the test decodes the media bytes with the gateway's decoders and
hands the arrays to the pipeline, while the service fetches the same bytes over HTTP and decodes them
itself. Processor keyword arguments are written out here (not imported from the worker) so that a change
in what the worker passes shows up as a failure.

The tiny checkpoint answers the same greedy text for a tone, silence, noise or a reversed clip, so equal
text alone cannot show that samples and pixels arrived intact: the worker runs with the encoder probe
(tests/encoder_probe.py), and each test also compares the log-mel features and pixel patches the encoders
read in the worker with those they read in the pipeline.
"""

from __future__ import annotations

import PIL.Image
import pytest
from transformers import pipeline

from omnigate.media import DecodeLimits
from omnigate_gateway.media.audio import decode_audio
from omnigate_gateway.media.image import decode_image
from omnigate_gateway.media.video import decode_video
from tests.support import encoder_probe, media_factory
from tests.support.stack import MODELS_DIR, start_stack

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
def probed(tmp_path_factory):
    """The real stack, its worker recording its encoder inputs: (stack, the probe's folder)."""
    probe_dir = tmp_path_factory.mktemp("encoder-probe")
    stack = start_stack(
        OMNI, tmp_path_factory.mktemp("omni-probed"), worker_env=encoder_probe.worker_env(probe_dir)
    )
    yield stack, probe_dir
    stack.gateway.stop()
    stack.worker.stop()


def _pipeline_text(pipe, **kwargs) -> tuple[str, list[encoder_probe.Record]]:
    """The pipeline's answer and what its encoders read."""
    with encoder_probe.recording() as seen:
        text = pipe(return_full_text=False, **kwargs)[0]["generated_text"]
    return text, seen


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
        "image": decode_image(files["image"], limits),
        "audio": decode_audio(files["audio"], 16000, limits),
        "video": decode_video(files["video"], 1.0, True, 16000, limits),
    }
    return urls, decoded


def _service_text(probed, content, **kwargs) -> tuple[str, list[encoder_probe.Record]]:
    """The service's answer and what the worker's encoders read for it."""
    stack, probe_dir = probed
    encoder_probe.clear(probe_dir)
    with stack.client() as client:
        result = client.generate_all(
            [{"role": "user", "content": content}], max_new_tokens=MAX_NEW_TOKENS, **kwargs
        )
    return result.text, encoder_probe.read(probe_dir)


def _video_kwargs(pipe, fps: float) -> dict:
    return {"fps": fps, "do_sample_frames": False, "size": dict(pipe.processor.video_processor.size)}


def test_text_only(probed, omni_pipeline):
    content = [{"type": "text", "text": "Tell me a story."}]
    expected, theirs = _pipeline_text(
        omni_pipeline, text=[{"role": "user", "content": content}], generate_kwargs=dict(OMNI_GENERATE)
    )
    assert expected
    got, ours = _service_text(probed, content)
    assert got == expected
    assert ours == theirs == [], "no encoder runs for text"


def test_text_and_image(probed, omni_pipeline, media):
    urls, decoded = media
    image = PIL.Image.fromarray(decoded["image"].pixels)
    question = {"type": "text", "text": "What is in this picture?"}
    expected, theirs = _pipeline_text(
        omni_pipeline,
        text=[{"role": "user", "content": [{"type": "image", "image": image}, question]}],
        generate_kwargs=dict(OMNI_GENERATE),
    )
    assert expected
    got, ours = _service_text(probed, [{"type": "image", "url": urls["image"]}, question])
    assert got == expected
    encoder_probe.assert_same(ours, theirs)


def test_text_and_audio(probed, omni_pipeline, media):
    urls, decoded = media
    question = {"type": "text", "text": "What do you hear in this audio?"}
    expected, theirs = _pipeline_text(
        omni_pipeline,
        text=[{"role": "user", "content": [{"type": "audio", "audio": decoded["audio"].samples}, question]}],
        generate_kwargs=dict(OMNI_GENERATE),
    )
    assert expected
    got, ours = _service_text(probed, [{"type": "audio", "url": urls["audio"]}, question])
    assert got == expected
    encoder_probe.assert_same(ours, theirs)


def test_text_and_video_at_one_fps(probed, omni_pipeline, media):
    urls, decoded = media
    video = decoded["video"]
    assert video.num_frames == 4 and video.sampled_fps == 1.0
    question = {"type": "text", "text": "Describe this video."}
    expected, theirs = _pipeline_text(
        omni_pipeline,
        text=[{"role": "user", "content": [{"type": "video", "video": video.frames}, question]}],
        generate_kwargs=dict(OMNI_GENERATE),
        processor_kwargs=_video_kwargs(omni_pipeline, 1.0),
    )
    assert expected
    got, ours = _service_text(probed, [{"type": "video", "url": urls["video"]}, question], fps=1)
    assert got == expected
    encoder_probe.assert_same(ours, theirs)


def test_video_with_its_audio_track(probed, omni_pipeline, media):
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
    expected, theirs = _pipeline_text(
        omni_pipeline,
        text=prompt,
        videos=[video.frames],
        audio=[video.audio.samples],
        load_audio_from_video=True,
        generate_kwargs={**OMNI_GENERATE, "use_audio_in_video": True},
        processor_kwargs={
            **_video_kwargs(omni_pipeline, 1.0),
            "load_audio_from_video": True,
            "audio_from_video_indices": [0],
            "sampling_rate": 16000,
        },
    )
    got, ours = _service_text(
        probed, [{"type": "video", "url": urls["video"]}, question], fps=1, load_audio_from_video=True
    )
    assert expected
    assert got == expected
    # The track really reaches the model: the audio encoder reads it, and its audio tokens are
    # interleaved into the prompt.
    assert sorted(kind for kind, _ in theirs) == ["audio", "vision"]
    encoder_probe.assert_same(ours, theirs)
    stack, _ = probed
    with stack.client() as client:
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
