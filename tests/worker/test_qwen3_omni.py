"""Qwen3-Omni on the worker: the tiny checkpoint (omnigate_tiny/qwen3_omni.py) and its family
(omnigate_worker/families/qwen3_omni.py), end to end on CPU.

Greedy text from the engine (batched and one request at a time) must equal transformers' own
``Qwen3OmniMoeForConditionalGeneration.generate`` on the same decoded media, for text, image, audio and video
prompts (and a video with its audio track). The reference side writes its processor and ``generate``
arguments out here rather than importing the worker's, so a change in what the worker passes shows up.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from omnigate.conversation import (  # noqa: E402
    AudioChunk,
    ContentPart,
    GenerationMode,
    GenerationParams,
    GenerationRequest,
    Message,
    Modality,
    Summary,
)
from omnigate.errors import InvalidInput  # noqa: E402
from omnigate.media import Audio, Image, Video  # noqa: E402
from omnigate_tiny import build as tiny  # noqa: E402
from omnigate_worker.engine import loading  # noqa: E402
from omnigate_worker.engine.transformers_engine import TransformersEngine  # noqa: E402
from omnigate_worker.families.qwen3_omni import Qwen3OmniFamily  # noqa: E402
from omnigate_worker.settings import WorkerSettings  # noqa: E402
from tests.support.engine_runs import alone, batched  # noqa: E402

pytestmark = pytest.mark.slow

FAMILY = "qwen3-omni"
MAX_NEW = 8
AUDIO_RATE_OUT = 24000  # code2wav: 1920 samples per code


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny.build_family(FAMILY, tmp_path_factory.mktemp("tiny-models")).path


@pytest.fixture(scope="module")
def loaded(checkpoint) -> loading.LoadedModel:
    return loading.load(str(checkpoint), "cpu", "auto", "auto", False)


@pytest.fixture(scope="module")
def engine(checkpoint, loaded) -> TransformersEngine:
    """Default settings: batched text (the engine picks the runner at warm-up), speech streaming on."""
    engine = TransformersEngine(loaded, WorkerSettings(model=str(checkpoint)), str(checkpoint))
    engine.warmup()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def speech_engine(checkpoint, loaded) -> TransformersEngine:
    """stream_speech off: one waveform at the end (as with it on, for this family)."""
    settings = WorkerSettings(model=str(checkpoint), stream_speech=False)
    engine = TransformersEngine(loaded, settings, str(checkpoint))
    engine.warmup()
    yield engine
    engine.close()


# --------------------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------------------


def test_build_is_deterministic_small_and_stamped(checkpoint, tmp_path):
    again = tiny.build_family(FAMILY, tmp_path)
    assert tiny.file_hashes(again.path) == tiny.file_hashes(checkpoint)
    assert tiny.is_up_to_date(checkpoint)
    assert again.size_bytes < 5_000_000
    assert not tiny.build_family(FAMILY, tmp_path).built  # up to date: skipped


def test_config_ids_are_real_tokens_and_codes(loaded):
    config, tokenizer = loaded.model.config, loaded.processor.tokenizer
    token = tokenizer.convert_ids_to_tokens
    thinker, talker = config.thinker_config, config.talker_config
    assert token(config.im_start_token_id) == "<|im_start|>"
    assert token(config.im_end_token_id) == "<|im_end|>"
    assert [token(config.system_token_id), token(config.user_token_id), token(config.assistant_token_id)] == [
        "system",
        "user",
        "assistant",
    ]
    assert [
        token(config.tts_pad_token_id),
        token(config.tts_bos_token_id),
        token(config.tts_eos_token_id),
    ] == [
        "<tts_pad>",
        "<tts_text_bos>",
        "<tts_text_eod>",
    ]
    for sub in (thinker, talker):
        assert token(sub.image_token_id) == "<|image_pad|>"
        assert token(sub.video_token_id) == "<|video_pad|>"
        assert token(sub.audio_token_id) == "<|audio_pad|>"
        assert token(sub.audio_start_token_id) == "<|audio_start|>"
        assert token(sub.vision_start_token_id) == "<|vision_start|>"
    vocab = talker.text_config.vocab_size
    codebook = config.code2wav_config.codebook_size
    # generate() suppresses [vocab - 1024, vocab) but the codec eos, so sampled codes fit the codebook
    assert vocab - 1024 == codebook == talker.code_predictor_config.vocab_size
    control = [talker.codec_pad_id, talker.codec_bos_id, talker.codec_eos_token_id, talker.codec_nothink_id]
    control += [talker.codec_think_bos_id, talker.codec_think_eos_id, *talker.speaker_id.values()]
    assert all(codebook <= i < vocab for i in control)
    assert len(set(control)) == len(control)
    assert len(tokenizer) <= thinker.text_config.vocab_size


# --------------------------------------------------------------------------------------------------------
# Text: equal to transformers' generate, batched and alone
# --------------------------------------------------------------------------------------------------------

_RNG = np.random.default_rng(7)
_IMAGE = _RNG.integers(0, 255, (60, 80, 3), dtype=np.uint8)
_AUDIO = (0.1 * np.sin(np.arange(24000) * 0.05)).astype(np.float32)
_TRACK = (0.1 * np.sin(np.arange(32000) * 0.03)).astype(np.float32)
_FRAMES = _RNG.integers(0, 255, (4, 56, 84, 3), dtype=np.uint8)
_FPS = 2.0


def _video(track: bool) -> Video:
    return Video(_FRAMES, [0.0, 0.5, 1.0, 1.5], _FPS, 10.0, 2.0, 20, Audio(_TRACK, 16000) if track else None)


_CASES = {
    "text": [],
    "image": [ContentPart(Modality.IMAGE, image=Image(_IMAGE))],
    "audio": [ContentPart(Modality.AUDIO, audio=Audio(_AUDIO, 16000))],
    "video": [ContentPart(Modality.VIDEO, video=_video(False))],
    "video-with-track": [ContentPart(Modality.VIDEO, video=_video(True))],
    "image-and-audio": [
        ContentPart(Modality.IMAGE, image=Image(_IMAGE)),
        ContentPart(Modality.AUDIO, audio=Audio(_AUDIO, 16000)),
    ],
}


def _request(case: str, mode=GenerationMode.TEXT, max_new_tokens=MAX_NEW, **kwargs) -> GenerationRequest:
    parts = [*_CASES[case], ContentPart(Modality.TEXT, text="What is in this?")]
    return GenerationRequest(
        messages=[Message("user", parts)],
        params=GenerationParams(max_new_tokens=max_new_tokens),
        mode=mode,
        use_audio_in_video=case == "video-with-track",
        **kwargs,
    )


def _reference(loaded, case: str) -> str:
    """transformers alone: chat template, processor, generate (greedy, text mode)."""
    from PIL import Image as PILImage

    model, processor = loaded.model, loaded.processor
    content, kwargs = [], {}
    if case.startswith("image"):
        content.append({"type": "image"})
        kwargs["images"] = [PILImage.fromarray(_IMAGE)]
    if case.endswith("audio"):
        content.append({"type": "audio"})
        kwargs.update(audio=[_AUDIO], sampling_rate=16000)
    if case.startswith("video"):
        content.append({"type": "video"})
        kwargs.update(
            videos=[_FRAMES],
            fps=_FPS,
            do_sample_frames=False,
            videos_kwargs={"input_data_format": "channels_last"},
            # Qwen3OmniMoeProcessor's class-level video size (128..768 * 32 * 32 pixels) overrides the saved one
            size=dict(processor.video_processor.size),
        )
        if case == "video-with-track":
            kwargs.update(
                audio=[_TRACK], sampling_rate=16000, load_audio_from_video=True, audio_from_video_indices=[0]
            )
    content.append({"type": "text", "text": "What is in this?"})
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=prompt, return_tensors="pt", **kwargs)
    with torch.inference_mode():
        sequences = model.generate(
            **inputs,
            generation_mode="text",
            thinker_max_new_tokens=MAX_NEW,
            thinker_do_sample=False,
            # generate() defaults to the real vocabulary's <|im_end|> (151645)
            thinker_eos_token_id=model.thinker.generation_config.eos_token_id,
            use_audio_in_video=case == "video-with-track",
        )
    return processor.tokenizer.decode(sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_the_family_serves_it_and_batches_its_text(engine):
    assert isinstance(engine._family, Qwen3OmniFamily)
    assert engine.info.architecture == "Qwen3OmniMoeForConditionalGeneration"
    assert {Modality.TEXT, Modality.IMAGE, Modality.AUDIO, Modality.VIDEO} <= set(
        engine.info.input_modalities
    )
    # batched over the dynamic cache: the slot runner's chunked prefill would drop deepstack features
    assert engine._batchable and engine.info.decode_runner == "dynamic cache"


def test_the_slot_runner_says_why_it_cannot_serve_it(checkpoint, loaded):
    settings = WorkerSettings(model=str(checkpoint), decode_runner="slots")
    with pytest.raises(ValueError, match="deepstack"):
        TransformersEngine(loaded, settings, str(checkpoint))


@pytest.mark.parametrize("case", list(_CASES))
def test_text_equals_transformers_generate(case, engine, loaded):
    want = _reference(loaded, case)
    assert want  # the tiny model writes something for every prompt
    text, events = alone(engine, _request(case))
    assert text == want
    assert isinstance(events[-1], Summary) and 0 < events[-1].output_tokens <= MAX_NEW


@pytest.mark.parametrize("prefill_tokens_per_step", [2048, 8])
async def test_a_mixed_batch_equals_transformers_generate(prefill_tokens_per_step, checkpoint, loaded):
    """Every prompt in one batch; with 8, every prompt is longer than a prefill step (where the slot runner
    would prefill in chunks and lose the visual deepstack features: video answers then differed)."""
    settings = WorkerSettings(model=str(checkpoint), prefill_tokens_per_step=prefill_tokens_per_step)
    engine = TransformersEngine(loaded, settings, str(checkpoint))
    engine.warmup()
    try:
        results = await batched(engine, [_request(case) for case in _CASES])
    finally:
        engine.close()
    for case, (text, events) in zip(_CASES, results, strict=True):
        assert text == _reference(loaded, case), case
        assert isinstance(events[-1], Summary)


# --------------------------------------------------------------------------------------------------------
# Speech
# --------------------------------------------------------------------------------------------------------


def test_with_speech_streaming_on_it_speaks_its_answer_whole(engine):
    """stream_speech (the default) streams Qwen2.5-Omni's speech; Qwen3-Omni's comes whole, sent in chunks."""
    assert Modality.AUDIO in engine.info.output_modalities
    assert engine.info.output_audio_sample_rate == AUDIO_RATE_OUT
    events = []
    engine.generate(_request("text", mode=GenerationMode.AUDIO), events.append, threading.Event())
    chunks = [event for event in events if isinstance(event, AudioChunk)]
    assert chunks and isinstance(events[-1], Summary) and events[-1].audio_seconds > 0


def test_speech_info(speech_engine):
    info = speech_engine.info
    assert Modality.AUDIO in info.output_modalities
    assert info.output_audio_sample_rate == AUDIO_RATE_OUT
    assert info.speakers == ["chelsie", "ethan"]
    with pytest.raises(InvalidInput, match="max_new_tokens >= 2"):
        speech_engine.validate(_request("text", mode=GenerationMode.AUDIO, max_new_tokens=1))
    for case in ("video-with-track", "image-and-audio"):  # transformers 5.23's talker fails on this mix
        with pytest.raises(InvalidInput, match="audio together with images or video"):
            speech_engine.validate(_request(case, mode=GenerationMode.AUDIO))
    with pytest.raises(InvalidInput, match="unknown speaker"):
        speech_engine.validate(_request("text", mode=GenerationMode.AUDIO, speaker="Nobody"))


@pytest.mark.parametrize(
    ("case", "speaker"), [("text", None), ("image", "chelsie"), ("audio", None), ("video", "ethan")]
)
def test_speech_is_audible_24khz_with_the_same_text(case, speaker, speech_engine, loaded):
    request = _request(case, mode=GenerationMode.AUDIO, speaker=speaker)
    speech_engine.validate(request)
    text, events = alone(speech_engine, request)
    assert text == _reference(loaded, case)  # the thinker's greedy text does not depend on speaking
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert chunks and {c.sample_rate for c in chunks} == {AUDIO_RATE_OUT}
    samples = np.concatenate([c.samples for c in chunks])
    assert np.all(np.isfinite(samples)) and np.abs(samples).max() <= 1.0
    assert float(np.sqrt(np.mean(samples**2))) > 1e-3  # not silence
    summary = events[-1]
    assert isinstance(summary, Summary)
    assert summary.audio_seconds == pytest.approx(len(samples) / AUDIO_RATE_OUT)
