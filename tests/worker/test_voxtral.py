"""Voxtral on the worker: the tiny checkpoint (omnigate_tiny/voxtral.py, a mistral-common ``tekken.json``
vocabulary) and its family (omnigate_worker/families/voxtral.py), end to end on CPU.

Greedy text from the engine (batched and one request at a time) must equal transformers' own
``VoxtralForConditionalGeneration.generate`` on inputs from ``VoxtralProcessor.apply_chat_template``, for
text-only and audio prompts. The reference side writes its conversation out here (audio as base64 WAV,
the processor's documented inline form) rather than importing the worker's. The audio is checked to reach
the model: the processor features equal the feature extractor's on the decoded samples, and different
clips of the same length give different features and different next-token logits.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mistral_common")

import soundfile  # noqa: E402

from omnigate.conversation import (  # noqa: E402
    ContentPart,
    GenerationParams,
    GenerationRequest,
    Message,
    Modality,
    Summary,
)
from omnigate.errors import InvalidInput  # noqa: E402
from omnigate.media import Audio, Image  # noqa: E402
from omnigate_tiny import build as tiny  # noqa: E402
from omnigate_worker.engine import loading  # noqa: E402
from omnigate_worker.engine.transformers_engine import TransformersEngine  # noqa: E402
from omnigate_worker.families.voxtral import VoxtralFamily  # noqa: E402
from omnigate_worker.settings import WorkerSettings  # noqa: E402
from tests.support.engine_runs import alone, batched  # noqa: E402

pytestmark = pytest.mark.slow

FAMILY = "voxtral"
MAX_NEW = 8
RATE = 16000
CHUNK_TOKENS = 375  # [AUDIO] tokens per 30 s chunk: 3000 mel frames, halved by the encoder, then 4 to a token


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny.build_family(FAMILY, tmp_path_factory.mktemp("tiny-models")).path


@pytest.fixture(scope="module")
def loaded(checkpoint) -> loading.LoadedModel:
    return loading.load(str(checkpoint), "cpu", "auto", "auto", False)


@pytest.fixture(scope="module")
def engine(checkpoint, loaded) -> TransformersEngine:
    engine = TransformersEngine(loaded, WorkerSettings(model=str(checkpoint)), str(checkpoint))
    engine.warmup()
    yield engine
    engine.close()


# --------------------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------------------


def test_the_tekken_vocabulary_is_mistral_commons_and_matches_the_config(checkpoint, loaded):
    """(test_tiny_models.py checks that the build is deterministic, as for every tiny family.)"""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    mistral = MistralTokenizer.from_file(str(checkpoint / "tekken.json"))
    tekken = mistral.instruct_tokenizer.tokenizer
    assert isinstance(tekken, Tekkenizer)
    audio = tekken.audio
    assert audio is not None
    assert (audio.sampling_rate, audio.frame_rate, audio.chunk_length_s) == (RATE, 12.5, 30.0)
    assert audio.encoding_config.num_mel_bins == loaded.model.config.audio_config.num_mel_bins == 128

    config, tokenizer = loaded.model.config, loaded.processor.tokenizer
    assert type(loaded.processor).__name__ == "VoxtralProcessor"
    assert type(tokenizer).__name__ == "MistralCommonBackend"
    # VoxtralProcessor hard-codes [AUDIO] as id 24; the model's placeholder must be the same token
    assert tokenizer.convert_ids_to_tokens(config.audio_token_id) == "[AUDIO]"
    assert config.audio_token_id == loaded.processor.audio_token_id == 24
    assert tekken.get_special_token("[BEGIN_AUDIO]") == 25 and tekken.get_special_token("[TRANSCRIBE]") == 34
    assert (tekken.bos_id, tekken.eos_id) == (1, 2)
    assert config.text_config.vocab_size == tekken.n_words == len(tokenizer)  # every id decodes


# --------------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------------

_RNG = np.random.default_rng(11)
_LENGTH = 24000  # 1.5 s
_TIME = np.arange(_LENGTH) / RATE
_CHIRP = (0.3 * np.sin(2 * np.pi * (200 * _TIME + 800 * _TIME**2))).astype(np.float32)  # 200 -> 2600 Hz
# Same length, different sound: a chirp, noise, silence, the chirp reversed and the chirp clipped.
_CLIPS = {
    "chirp": _CHIRP,
    "noise": (0.1 * _RNG.standard_normal(_LENGTH)).astype(np.float32),
    "silence": np.zeros(_LENGTH, dtype=np.float32),
    "reversed chirp": _CHIRP[::-1].copy(),
    "clipped chirp": np.clip(4 * _CHIRP, -0.3, 0.3),
}
_LONG = (0.2 * np.sin(np.arange(40 * RATE) * 0.01)).astype(np.float32)  # 40 s: two 30 s chunks
_QUESTION = "What can you hear in this audio?"

# (system text or None, [(clip name, ...)] of the user turn)
_CASES = {
    "text": (None, []),
    "audio": (None, ["chirp"]),
    "two-audio": (None, ["noise", "chirp"]),
    "system-and-text": ("You are a helpful assistant.", []),
    "long-audio": (None, ["long"]),
}


def _clip(name: str) -> np.ndarray:
    return _LONG if name == "long" else _CLIPS[name]


def _request(case: str) -> GenerationRequest:
    system, clips = _CASES[case]
    messages = [Message("system", [ContentPart(Modality.TEXT, text=system)])] if system else []
    parts = [ContentPart(Modality.AUDIO, audio=Audio(_clip(name), RATE)) for name in clips]
    messages.append(Message("user", [*parts, ContentPart(Modality.TEXT, text=_QUESTION)]))
    return GenerationRequest(messages=messages, params=GenerationParams(max_new_tokens=MAX_NEW))


def _base64_wav(samples: np.ndarray) -> str:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, RATE, format="WAV", subtype="FLOAT")
    return base64.b64encode(buffer.getvalue()).decode()


def _reference_inputs(loaded, case: str):
    """transformers alone: the processor's chat template with inline base64 audio (its documented path)."""
    system, clips = _CASES[case]
    conversation = [{"role": "system", "content": system}] if system else []
    content = [{"type": "audio", "base64": _base64_wav(_clip(name))} for name in clips]
    content.append({"type": "text", "text": _QUESTION})
    conversation.append({"role": "user", "content": content})
    return loaded.processor.apply_chat_template(conversation)


def _reference(loaded, case: str) -> str:
    inputs = _reference_inputs(loaded, case)
    with torch.inference_mode():
        sequences = loaded.model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    prompt = inputs["input_ids"].shape[1]
    return loaded.processor.tokenizer.decode(sequences[0, prompt:], skip_special_tokens=True)


def test_the_family_serves_it_and_batches_its_text(engine):
    assert isinstance(engine._family, VoxtralFamily)
    info = engine.info
    assert info.architecture == "VoxtralForConditionalGeneration"
    assert set(info.input_modalities) == {Modality.TEXT, Modality.AUDIO}
    assert info.output_modalities == [Modality.TEXT]
    assert info.input_audio_sample_rate == RATE
    assert engine._batchable and info.decode_runner.startswith("slots")


@pytest.mark.parametrize("case", list(_CASES))
def test_the_prompt_equals_the_processors(case, engine, loaded):
    """Same ids and features as the processor's own chat template; each audio is [BEGIN_AUDIO] and 375
    [AUDIO] tokens per started 30 s."""
    want = _reference_inputs(loaded, case)
    got = engine.prepare(_request(case)).inputs
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert ("input_features" in got) == ("input_features" in want) == bool(_CASES[case][1])
    if "input_features" in want:
        assert torch.equal(got["input_features"], want["input_features"])
    chunks = sum(-(-len(_clip(name)) // (30 * RATE)) for name in _CASES[case][1])
    assert int((got["input_ids"] == 24).sum()) == CHUNK_TOKENS * chunks
    assert int((got["input_ids"] == 25).sum()) == len(_CASES[case][1])


@pytest.mark.parametrize("case", list(_CASES))
def test_text_equals_transformers_generate(case, engine, loaded):
    want = _reference(loaded, case)
    assert want  # the tiny model writes something for every prompt
    text, events = alone(engine, _request(case))
    assert text == want
    assert isinstance(events[-1], Summary) and 0 < events[-1].output_tokens <= MAX_NEW


@pytest.mark.parametrize("prefill_tokens_per_step", [2048, 64])
async def test_a_mixed_batch_equals_transformers_generate(prefill_tokens_per_step, checkpoint, loaded):
    """Every prompt in one batch; with 64, the audio prompts (over 375 tokens) are prefilled in chunks."""
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
# The audio reaches the model
# --------------------------------------------------------------------------------------------------------


def _one_clip(samples: np.ndarray) -> GenerationRequest:
    parts = [ContentPart(Modality.AUDIO, audio=Audio(samples, RATE)), ContentPart(Modality.TEXT, text="Hi")]
    return GenerationRequest(messages=[Message("user", parts)], params=GenerationParams(max_new_tokens=2))


def test_the_features_are_the_decoded_samples(engine, loaded):
    """The worker's float samples reach the feature extractor unchanged (the float WAV is lossless)."""
    extractor = loaded.processor.feature_extractor
    for samples in _CLIPS.values():
        got = engine.prepare(_one_clip(samples)).inputs["input_features"]
        want = extractor(
            np.pad(samples, (0, 30 * RATE - len(samples))), sampling_rate=RATE, return_tensors="pt"
        )
        assert torch.equal(got, want["input_features"])


def test_different_audio_gives_different_features_and_logits(engine, loaded):
    """Clips of the same length (a chirp, noise, silence, the chirp reversed, the chirp clipped) give the
    same prompt ids but pairwise different features and next-token logits (by far more than float noise:
    the smallest gap, chirp against reversed chirp, is about 0.005)."""
    features, logits, ids = {}, {}, {}
    for name, samples in _CLIPS.items():
        inputs = engine.prepare(_one_clip(samples)).inputs
        ids[name] = inputs["input_ids"]
        features[name] = inputs["input_features"]
        with torch.inference_mode():
            logits[name] = loaded.model(**inputs).logits[0, -1]
    names = list(_CLIPS)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert torch.equal(ids[a], ids[b])
            assert not torch.equal(features[a], features[b]), (a, b)
            assert float((logits[a] - logits[b]).abs().max()) > 1e-3, (a, b)


# --------------------------------------------------------------------------------------------------------
# Refusals, and transcription (transformers only: Omnigate's API has no transcription request)
# --------------------------------------------------------------------------------------------------------


def test_what_it_cannot_take_is_invalid_input(engine):
    image = GenerationRequest(
        messages=[Message("user", [ContentPart(Modality.IMAGE, image=Image(np.zeros((8, 8, 3), np.uint8)))])]
    )
    with pytest.raises(InvalidInput, match="cannot take image input"):
        engine.validate(image)
    ends_with_answer = GenerationRequest(
        messages=[
            Message("user", [ContentPart(Modality.TEXT, text="Hi")]),
            Message("assistant", [ContentPart(Modality.TEXT, text="Hello")]),
        ]
    )
    with pytest.raises(InvalidInput, match="tokenizer refused the conversation"):
        engine.prepare(ends_with_answer)
    # mistral-common refuses a system prompt beside audio before tokenizer v13 (the tiny vocabulary is v7)
    system_and_audio = _one_clip(_CLIPS["chirp"])
    system_and_audio.messages.insert(0, Message("system", [ContentPart(Modality.TEXT, text="Be brief.")]))
    with pytest.raises(InvalidInput, match="system messages .* and audio"):
        engine.prepare(system_and_audio)
    too_short = _one_clip(np.zeros(100, dtype=np.float32))
    with pytest.raises(InvalidInput, match="minimum"):
        engine.prepare(too_short)


def test_the_checkpoint_transcribes_through_transformers(loaded):
    """``apply_transcription_request`` builds ``<s>[INST][BEGIN_AUDIO][AUDIO]*375[/INST]lang:en[TRANSCRIBE]``
    on the tiny vocabulary and ``generate`` runs on it: what an Omnigate transcription request would use."""
    processor = loaded.processor
    inputs = processor.apply_transcription_request(
        audio=[_CLIPS["chirp"]], model_id="tiny-voxtral", language="en", sampling_rate=RATE, format=["wav"]
    )
    ids = inputs["input_ids"][0].tolist()
    assert ids[:3] == [1, 3, 25] and ids[3 : 3 + CHUNK_TOKENS] == [24] * CHUNK_TOKENS
    assert processor.tokenizer.decode(ids[3 + CHUNK_TOKENS :], skip_special_tokens=False) == (
        "[/INST]lang:en[TRANSCRIBE]"
    )
    with torch.inference_mode():
        sequences = loaded.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert sequences.shape[1] > len(ids)
