"""The tiny checkpoints: deterministic builds, and the transformers 5.23 call sequences the worker relies on.

Everything here runs on CPU in well under a minute: the checkpoints are built once per session into a
temporary folder (a build takes a few seconds) and every generation is capped at a handful of tokens.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from transformers import AutoModelForMultimodalLM, AutoProcessor, pipeline  # noqa: E402

from omnigate_tiny import build as tiny_build  # noqa: E402
from omnigate_tiny import builders as tiny_models  # noqa: E402

pytestmark = pytest.mark.slow

OMNI, JANUS, QWEN2_AUDIO, GEMMA3N, VOXTRAL = "omni", "janus", "qwen2-audio", "gemma3n", "voxtral"
AUDIO_RATE_IN = 16000  # what the Qwen feature extractors expect
OMNI_AUDIO_RATE_OUT = 24000  # what Qwen2.5-Omni's token2wav produces
MAX_NEW = 5  # generation limit used throughout
# Qwen2.5-Omni's processor class forces 128..768 * 28 * 28 pixel video frames over the saved video
# processor config (notes item 5); tests pass a small size per call.
SMALL_VIDEO = {"videos_kwargs": {"size": {"shortest_edge": 56 * 56, "longest_edge": 16 * 28 * 28}}}


# --------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """All families, built once for the session."""
    out = tmp_path_factory.mktemp("tiny-models")
    tiny_build.build(out, list(tiny_build.FAMILIES))
    return out


def _path(models_dir: Path, family: str) -> Path:
    return models_dir / tiny_build.FAMILIES[family].folder


@pytest.fixture(scope="session")
def loaded(models_dir):
    """Load each family at most once per session: ``loaded(family) -> (model, processor)``."""
    cache = {}

    def load(family: str):
        if family not in cache:
            path = _path(models_dir, family)
            model = AutoModelForMultimodalLM.from_pretrained(path).eval()
            cache[family] = (model, AutoProcessor.from_pretrained(path))
        return cache[family]

    return load


def _image() -> Image.Image:
    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (96, 128, 3), dtype=np.uint8))


def _audio(seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * AUDIO_RATE_IN)) / AUDIO_RATE_IN
    return (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def _video(frames: int = 8) -> np.ndarray:
    """uint8 (T, H, W, 3) frames."""
    return np.random.RandomState(1).randint(0, 256, (frames, 64, 64, 3), dtype=np.uint8)


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _inputs(processor, messages, **processor_kwargs):
    return processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs=processor_kwargs,
    )


def _new_tokens(sequences, inputs) -> int:
    return sequences.shape[-1] - inputs["input_ids"].shape[-1]


def _rms(wave) -> float:
    return float(wave.float().pow(2).mean().sqrt())


# --------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------


def test_build_is_byte_for_byte_deterministic(models_dir, tmp_path):
    """A second build, through the CLI in a fresh process (other hash seed, one thread), is identical."""
    again = tmp_path / "again"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "omnigate_tiny", "--out", str(again)],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    for family in tiny_build.FAMILIES.values():
        first = tiny_build.file_hashes(models_dir / family.folder)
        second = tiny_build.file_hashes(again / family.folder)
        assert first == second, family.name
        assert (models_dir / family.folder / tiny_build.STAMP_FILE).read_bytes() == (
            again / family.folder / tiny_build.STAMP_FILE
        ).read_bytes()


def test_each_folder_has_what_from_pretrained_needs(models_dir):
    for name, family in tiny_build.FAMILIES.items():
        files = set(tiny_build.file_hashes(models_dir / family.folder))
        expected = {"config.json", "generation_config.json", "model.safetensors", "processor_config.json"}
        if name == VOXTRAL:
            expected.add("tekken.json")  # mistral-common's vocabulary; the prompt format is its code's
        else:
            expected |= {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
        if name == OMNI:
            expected.add("spk_dict.pt")
        assert expected <= files, name
        stamp = json.loads((models_dir / family.folder / tiny_build.STAMP_FILE).read_text())
        assert stamp["recipe_version"] == tiny_models.RECIPE_VERSION
        assert set(stamp["files"]) == files


def test_up_to_date_build_is_skipped_and_a_changed_one_rebuilt(tmp_path):
    first = tiny_build.build_family(QWEN2_AUDIO, tmp_path)
    assert first.built
    assert not tiny_build.build_family(QWEN2_AUDIO, tmp_path).built
    assert tiny_build.build_family(QWEN2_AUDIO, tmp_path, force=True).built

    (first.path / "config.json").write_text("{}")
    assert not tiny_build.is_up_to_date(first.path)
    assert tiny_build.build_family(QWEN2_AUDIO, tmp_path).built
    assert tiny_build.is_up_to_date(first.path)


def test_interrupted_build_leaves_no_folder(tmp_path, monkeypatch):
    def crash(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setitem(tiny_build.FAMILIES, "crash", tiny_build.Family("crash", "tiny-crash", crash))
    with pytest.raises(KeyboardInterrupt):
        tiny_build.build_family("crash", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_builds_one_family_and_skips_it_next_time(tmp_path, caplog):
    caplog.set_level("INFO")
    assert tiny_build.main(["--out", str(tmp_path), "--family", QWEN2_AUDIO]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-qwen2-audio"]
    assert tiny_build.main(["--out", str(tmp_path), "--family", QWEN2_AUDIO]) == 0
    assert "up to date" in caplog.text


# --------------------------------------------------------------------------------------------------------
# Prompt formats
# --------------------------------------------------------------------------------------------------------


def test_omni_prompt_format(loaded):
    _, processor = loaded(OMNI)
    messages = _user(
        {"type": "image", "image": _image()},
        {"type": "audio", "audio": _audio()},
        {"type": "video", "video": _video()},
        _text("What is this?"),
    )
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        f"<|im_start|>system\n{tiny_models.QWEN2_5_OMNI_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n<|vision_bos|><|IMAGE|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>"
        "<|vision_bos|><|VIDEO|><|vision_eos|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(with_system, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen2_audio_prompt_format(loaded):
    _, processor = loaded(QWEN2_AUDIO)
    messages = _user({"type": "audio", "audio": _audio()}, _text("What is that sound?"))
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhat is that sound?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_gemma3n_prompt_format(loaded):
    _, processor = loaded(GEMMA3N)
    messages = [
        {"role": "system", "content": [_text("Be brief.")]},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": _image()},
                {"type": "audio", "audio": _audio()},
                _text("What is this?"),
            ],
        },
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<bos><start_of_turn>user\nBe brief.\n\n<image_soft_token><audio_soft_token>What is this?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    # Each soft token expands to its fixed number of tokens between begin/end markers, and the ids of the
    # multimodal blocks follow the text vocabulary as in the real model.
    inputs = _inputs(processor, messages)
    ids = inputs["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    assert ids.count(tokenizer.image_token_id) == processor.image_seq_length
    assert ids.count(tokenizer.audio_token_id) == processor.audio_seq_length
    assert min(tokenizer.image_token_id, tokenizer.audio_token_id) >= tiny_models._GEMMA3N_TEXT_VOCAB


def test_janus_prompt_format(loaded):
    _, processor = loaded(JANUS)
    messages = _user(_text("Describe it."), {"type": "image", "image": _image()})
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|User|>: Describe it.\n<image_placeholder>\n\n<|Assistant|>:"
    )
    # The tokenizer prepends BOS; the placeholder expands to the image's tokens between boi/eoi.
    inputs = _inputs(processor, messages)
    ids = inputs["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.image_token_id) == processor.num_image_tokens


# --------------------------------------------------------------------------------------------------------
# Loading + generate, every input modality of every family
# --------------------------------------------------------------------------------------------------------

# (family, media part or None for text only)
_CASES = [
    (OMNI, None),
    (OMNI, "image"),
    (OMNI, "audio"),
    (OMNI, "video"),
    (JANUS, None),
    (JANUS, "image"),
    (QWEN2_AUDIO, None),
    (QWEN2_AUDIO, "audio"),
    (GEMMA3N, None),
    (GEMMA3N, "image"),
    (GEMMA3N, "audio"),
]
_MEDIA = {
    "image": lambda: {"type": "image", "image": _image()},
    "audio": lambda: {"type": "audio", "audio": _audio()},
    "video": lambda: {"type": "video", "video": _video()},
}


@pytest.mark.parametrize(("family", "modality"), _CASES, ids=[f"{f}-{m or 'text'}" for f, m in _CASES])
def test_generate_text(loaded, family, modality):
    model, processor = loaded(family)
    parts = ([_MEDIA[modality]()] if modality else []) + [_text("What is this?")]
    inputs = _inputs(processor, _user(*parts), **(SMALL_VIDEO if modality == "video" else {}))
    if family == OMNI:
        # Qwen2.5-Omni ignores max_new_tokens: the thinker has its own limit, and without
        # generation_mode="text" the talker would run too.
        sequences = model.generate(**inputs, thinker_max_new_tokens=MAX_NEW, generation_mode="text")
    else:
        sequences = model.generate(**inputs, max_new_tokens=MAX_NEW)
    assert 1 <= _new_tokens(sequences, inputs) <= MAX_NEW
    assert isinstance(processor.batch_decode(sequences, skip_special_tokens=True)[0], str)


@pytest.mark.parametrize("family", [OMNI, JANUS, QWEN2_AUDIO, GEMMA3N])
def test_any_to_any_pipeline_text(models_dir, family):
    pipe = pipeline("any-to-any", model=str(_path(models_dir, family)))
    messages = _user(_text("Hello, how are you?"))
    if family == OMNI:
        # pipeline's max_new_tokens reaches Qwen2_5OmniForConditionalGeneration.generate as a shared kwarg
        # that both sub-models already set from their own limits (thinker 1024, talker 4096), so it is
        # ignored. Pass the Omni limit, and generation_mode="text" (the pipeline only forwards non-"text"
        # modes), through generate_kwargs.
        out = pipe(
            text=messages,
            return_full_text=False,
            generate_kwargs={"thinker_max_new_tokens": MAX_NEW, "generation_mode": "text"},
        )
    else:
        out = pipe(text=messages, return_full_text=False, max_new_tokens=MAX_NEW)
    assert isinstance(out[0]["generated_text"], str)


# --------------------------------------------------------------------------------------------------------
# Qwen2.5-Omni speech output
# --------------------------------------------------------------------------------------------------------


def _assert_speech(model, wave, talker_limit: int) -> None:
    """A finite, audible waveform at 24 kHz of at most ``talker_limit`` codec tokens."""
    assert wave.ndim == 1 and wave.numel() > 0
    assert bool(torch.isfinite(wave).all())
    assert _rms(wave) > 1e-3
    # token2wav: each codec token -> `repeats` mel frames -> prod(upsample_rates) samples. At 24 kHz that is
    # 480 samples, the real model's 20 ms per codec token (50 Hz codec, 100 Hz mel).
    t2w = model.config.token2wav_config
    samples_per_code = t2w.dit_config.repeats * math.prod(t2w.bigvgan_config.upsample_rates)
    assert samples_per_code == OMNI_AUDIO_RATE_OUT // 50
    assert wave.numel() % samples_per_code == 0
    assert wave.numel() <= talker_limit * samples_per_code


def test_omni_speech_from_text(loaded):
    model, processor = loaded(OMNI)
    inputs = _inputs(processor, _user(_text("Say hello.")))
    torch.manual_seed(0)  # the talker samples and token2wav starts from noise
    sequences, wave = model.generate(**inputs, thinker_max_new_tokens=MAX_NEW, talker_max_new_tokens=20)
    assert 1 <= _new_tokens(sequences, inputs) <= MAX_NEW
    _assert_speech(model, wave, 20)
    # The second speaker works too (Chelsie is the default).
    _, other = model.generate(**inputs, thinker_max_new_tokens=2, talker_max_new_tokens=5, speaker="Ethan")
    _assert_speech(model, other, 5)


def test_omni_speech_needs_two_thinker_tokens(loaded):
    """transformers 5.23 fails to build the talker input when the thinker produced a single token (limit 1,
    or EOS first): callers asking for speech must allow at least 2 thinker tokens and expect this error
    when the thinker stops at once. If this test fails, transformers fixed it and the guard can go."""
    model, processor = loaded(OMNI)
    inputs = _inputs(processor, _user(_text("Hi")))
    with pytest.raises(ValueError, match="non-empty list of Tensors"):
        model.generate(**inputs, thinker_max_new_tokens=1, talker_max_new_tokens=1)


def test_omni_speech_from_image(loaded):
    """With audio output, pixels must be handed to the thinker alone (notes item 2).

    Un-prefixed ``pixel_values`` also reach the talker, whose generate() rejects them ("model_kwargs are not
    used"). ``image_grid_thw`` stays shared: the talker lays out its positions with it.
    """
    model, processor = loaded(OMNI)
    inputs = dict(_inputs(processor, _user({"type": "image", "image": _image()}, _text("What is this?"))))
    with pytest.raises(ValueError, match="pixel_values"):
        model.generate(**inputs, thinker_max_new_tokens=2, talker_max_new_tokens=1)
    inputs["thinker_pixel_values"] = inputs.pop("pixel_values")
    torch.manual_seed(0)
    _, wave = model.generate(**inputs, thinker_max_new_tokens=MAX_NEW, talker_max_new_tokens=10)
    _assert_speech(model, wave, 10)


def test_omni_video_with_its_audio_track(loaded):
    """A video's audio track goes in as a 16 kHz array tied to the video (notes item 7).

    The prompt has only the video placeholder; the processor interleaves the track's audio tokens with the
    video tokens in 2 s chunks. Frames are sampled at ``fps`` from ``video_metadata`` (the source rate),
    and ``generate`` needs ``use_audio_in_video=True`` to lay out the positions the same way.
    """
    model, processor = loaded(OMNI)
    frames = _video(8)  # 2 s at 4 fps
    track = _audio(2.0)
    prompt = processor.apply_chat_template(
        _user({"type": "video", "video": frames}, _text("What happens?")), add_generation_prompt=True
    )
    inputs = processor(
        text=prompt,
        videos=[frames],
        audio=[track],
        audio_from_video_indices=[0],
        load_audio_from_video=True,
        fps=2.0,
        video_metadata=[{"total_num_frames": 8, "fps": 4.0, "duration": 2.0}],
        do_sample_frames=True,
        return_tensors="pt",
        **SMALL_VIDEO,
    )
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]]  # 4 sampled frames, 2 per temporal patch
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(processor.audio_token_id) > 0 and ids.count(processor.video_token_id) > 0

    sequences = model.generate(
        **inputs, use_audio_in_video=True, thinker_max_new_tokens=MAX_NEW, generation_mode="text"
    )
    assert 1 <= _new_tokens(sequences, inputs) <= MAX_NEW

    speech_inputs = dict(inputs)
    speech_inputs["thinker_pixel_values_videos"] = speech_inputs.pop("pixel_values_videos")
    torch.manual_seed(0)
    _, wave = model.generate(
        **speech_inputs, use_audio_in_video=True, thinker_max_new_tokens=MAX_NEW, talker_max_new_tokens=10
    )
    _assert_speech(model, wave, 10)


# --------------------------------------------------------------------------------------------------------
# Janus image output
# --------------------------------------------------------------------------------------------------------


def generate_janus_image(model, processor, prompt: str) -> Image.Image:
    """Text-to-image with Janus in transformers 5.23, the sequence that works.

    1. ``processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
       return_dict=True, return_tensors="pt", processor_kwargs={"generation_mode": "image"})``: the
       processor appends ``<begin_of_image>`` to the prompt.
    2. ``model.generate(**inputs, generation_mode="image")`` returns ``(batch, num_image_tokens)`` VQ codes;
       it reads ``generation_kwargs["boi_token_id"]`` and ``guidance_scale`` from the generation config.
    3. ``model.decode_image_tokens(codes)`` under ``torch.no_grad()`` (it does not disable grad itself)
       gives ``(batch, H, W, 3)`` floats in the normalized space.
    4. ``processor.postprocess(list(pixels.float()), return_tensors="pt")["pixel_values"]`` un-normalizes
       to uint8 ``(batch, 3, H, W)``; convert to PIL yourself. ``return_tensors="PIL.Image.Image"`` (what
       ``pipeline(..., generation_mode="image")`` uses) raises "PIL.Image.Image is not a valid TensorType".
    """
    inputs = _inputs(processor, _user(_text(prompt)), generation_mode="image")
    codes = model.generate(**inputs, generation_mode="image")
    with torch.no_grad():
        pixels = model.decode_image_tokens(codes)
    images = processor.postprocess(list(pixels.float()), return_tensors="pt")["pixel_values"]
    return Image.fromarray(images[0].permute(1, 2, 0).numpy())


def test_janus_image_generation(loaded):
    model, processor = loaded(JANUS)
    image = generate_janus_image(model, processor, "A red apple on a wooden table.")
    assert image.mode == "RGB"
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 0  # not a blank image
