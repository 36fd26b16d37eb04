"""Deterministic tiny random-weight checkpoints, built offline.

The worker keeps the real loading path (``AutoModelForMultimodalLM.from_pretrained`` +
``AutoProcessor.from_pretrained``) and is tested against small checkpoints that this module builds without
any download: real architectures and real prompt formats, random weights, a byte-level BPE tokenizer
trained on a fixed in-code corpus.

    python -m omnigate_tiny --out models [--force]
        [--family omni|janus|qwen2-audio|gemma3n|qwen3-omni|voxtral|all]

Each family lands in its own folder under ``--out``:

- ``tiny-qwen2.5-omni``  Qwen2_5OmniForConditionalGeneration (thinker + talker + token2wav, ``spk_dict.pt``);
  image, video, audio and text in, text and 24 kHz speech out. The project's default model.
- ``tiny-janus``         JanusForConditionalGeneration; image and text in, text or a 64x64 image out.
- ``tiny-qwen2-audio``   Qwen2AudioForConditionalGeneration; audio and text in, text out.
- ``tiny-gemma3n``       Gemma3nForConditionalGeneration (MobileNetV5 vision encoder from timm, conformer audio
  encoder, AltUp/LAuReL text model with KV sharing); image, audio and text in, text out.
- ``tiny-qwen3-omni``    Qwen3OmniMoeForConditionalGeneration (MoE thinker with deepstack vision, MoE talker
  + code predictor + code2wav; built by ``qwen3_omni.py``); image, video, audio and text in, text and
  24 kHz speech out. Drive it as Qwen2.5-Omni below, but pass ``thinker_eos_token_id`` (``generate``
  defaults to the real vocabulary's 151645) and a lower-case speaker (``chelsie``, ``ethan``).
- ``tiny-voxtral``       VoxtralForConditionalGeneration (Whisper-style audio encoder, projector, Llama;
  built by ``voxtral.py``, with a tiny mistral-common ``tekken.json``); audio and text in, text out. Its
  processor takes audio only through ``apply_chat_template(conversation)`` (audio parts as ``{"type":
  "audio", "base64": ...}``, a url or a path) and ``apply_transcription_request(audio=[array],
  model_id=..., language="en", sampling_rate=16000, format=["wav"])``, both tokenized; then
  ``generate(**inputs)``.

A build is byte-for-byte deterministic (fixed seed, fixed corpus). It happens in a temporary folder next
to the target that is renamed into place at the end, so an interrupted build never leaves a half folder.
The folder then holds ``omnigate-build.json`` (recipe version + SHA-256 of every file); a later run skips a
family whose folder still matches its stamp, unless ``--force`` is given. Bump ``RECIPE_VERSION`` whenever
a change here alters what is written.

How to drive these checkpoints in transformers 5.23 (each sequence is exercised by
``tests/worker/test_tiny_models.py``), with ``inputs = processor.apply_chat_template(messages,
add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")``:

- Qwen2.5-Omni ignores ``max_new_tokens``. Text: ``model.generate(**inputs, thinker_max_new_tokens=n,
  generation_mode="text")`` returns the sequences. Speech: ``model.generate(**inputs,
  thinker_max_new_tokens=n, talker_max_new_tokens=m, speaker="Chelsie")`` returns ``(sequences,
  waveform)``, a 1-D float tensor at 24 kHz (480 samples per talker token).
- Omni speech with image or video input: rename ``pixel_values`` / ``pixel_values_videos`` to
  ``thinker_pixel_values`` / ``thinker_pixel_values_videos`` (un-prefixed, they also reach the talker, which
  rejects them); keep ``image_grid_thw`` / ``video_grid_thw`` un-prefixed, the talker's positions use them.
- Omni video with its audio track: render the prompt with ``apply_chat_template(..., tokenize=False)``
  (video placeholder only, no audio part), then ``processor(text=prompt, videos=[frames], audio=[pcm_16k],
  audio_from_video_indices=[0], load_audio_from_video=True, fps=2.0, do_sample_frames=True,
  video_metadata=[{"total_num_frames": n, "fps": source_fps, "duration": seconds}],
  videos_kwargs={"size": {...}}, return_tensors="pt")`` and ``generate(..., use_audio_in_video=True)``.
  The Omni processor class overrides the saved video frame size; pass ``videos_kwargs={"size": ...}``
  per call (``processor_kwargs={"videos_kwargs": ...}`` through ``apply_chat_template``).
- Omni through ``pipeline("any-to-any")``: the limit goes in ``generate_kwargs``, e.g.
  ``pipe(text=messages, return_full_text=False, generate_kwargs={"thinker_max_new_tokens": n,
  "generation_mode": "text"})``; for speech, ``generation_mode="audio"`` plus both limits in
  ``generate_kwargs``.
- Janus image output: ``apply_chat_template(..., processor_kwargs={"generation_mode": "image"})``, then
  ``codes = model.generate(**inputs, generation_mode="image")``, ``pixels = model.decode_image_tokens(codes)``
  under ``torch.no_grad()``, ``processor.postprocess(list(pixels.float()), return_tensors="pt")`` gives uint8
  ``(batch, 3, 64, 64)``. The pipeline's image postprocess (``return_tensors="PIL.Image.Image"``) raises.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor, WhisperFeatureExtractor

# Bump whenever a change in the builders changes the bytes of any built file (build.py stamps it).
RECIPE_VERSION = 1
SEED = 20240611

# --------------------------------------------------------------------------------------------------------
# Shared pieces: corpus, tokenizer, feature extractor
# --------------------------------------------------------------------------------------------------------

# The fixed corpus the byte-level BPE is trained on. Chat role names, media words and common English make
# frequent words single tokens, so prompts tokenize into realistic, short sequences.
_CORPUS = (
    "system user assistant system user assistant system user assistant",
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech.",
    "You are a helpful assistant. You are a helpful language and vision assistant.",
    "What is in this image? Describe the picture in detail. What color is the sky?",
    "What can you hear in this audio? Transcribe the speech. What sound is that?",
    "What happens in this video? Describe the scene, the people and the objects.",
    "Please answer the question. Tell me a short story about a cat and a dog.",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.",
    "Hello, how are you today? I am fine, thank you. The weather is nice and the sun is shining.",
    "Generate an image of a red apple on a wooden table. Draw a small house near a river.",
    "one two three four five six seven eight nine ten hundred thousand",
    "0 1 2 3 4 5 6 7 8 9 10 16 24 32 64 100 2024 3.14",
    "Translate this sentence into French. Summarize the following text in one sentence.",
    "This is a test. This is only a test. Testing, testing, one two three.",
)
# Target size of the trained BPE vocabulary (bytes + merges); the corpus may end the merges earlier.
_BPE_VOCAB_SIZE = 512

# The Qwen2 special tokens, in the real tokenizer's order (ids follow the BPE vocabulary).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|vision_pad|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
)
# The named tokens the Qwen processors read from the tokenizer (``tokenizer.image_token`` and so on).
QWEN_NAMED_TOKENS = {
    "image_token": "<|IMAGE|>",
    "audio_token": "<|AUDIO|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}


def _train_byte_level_bpe(
    pre_tokenizer: Any, normalizer: Any = None
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE on ``_CORPUS``; return its vocabulary and merges (no special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return dict(model["vocab"]), [tuple(pair) for pair in model["merges"]]


def _with_specials(vocab: dict[str, int], specials: Iterable[str]) -> dict[str, int]:
    """Return ``vocab`` with ``specials`` appended, in order, after its last id."""
    vocab = dict(vocab)
    for token in specials:
        vocab[token] = len(vocab)
    return vocab


def build_qwen_tokenizer():
    """The Qwen2 tokenizer shared by Qwen2.5-Omni and Qwen2-Audio.

    A byte-level BPE with Qwen2's pre-tokenizer (split regex + ByteLevel without prefix space) trained on
    the fixed corpus, wrapped in transformers' ``Qwen2Tokenizer``, with the Qwen special tokens appended in
    their real order and the processors' named tokens (``image_token``, ``audio_bos_token``, ...) set.
    """
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    vocab, merges = _train_byte_level_bpe(pre_tokenizer, normalizers.NFC())
    tokenizer = Qwen2Tokenizer(
        vocab=_with_specials(vocab, QWEN_SPECIAL_TOKENS),
        merges=merges,  # type: ignore[arg-type]  # tokenizers' BPE takes (left, right) pairs; the stub says str
        unk_token=None,  # type: ignore[arg-type]  # no unknown token (byte-level BPE); the stub says str
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        extra_special_tokens=dict(QWEN_NAMED_TOKENS),
    )
    # Registers the specials the processors do not name (<|im_start|>, <|box_end|>, ...) as special
    # added tokens; they are already in the vocabulary, so no id changes.
    tokenizer.add_tokens([AddedToken(token, special=True) for token in QWEN_SPECIAL_TOKENS])
    return tokenizer


def _single_token_id(tokenizer: Any, text: str) -> int:
    """Id of ``text`` when the tokenizer encodes it as one token (the corpus makes sure of it)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise RuntimeError(f"{text!r} should be one token in the tiny vocabulary, got {ids}")
    return ids[0]


def _embedding_rows(tokenizer: Any, spare: int = 16, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer: its size plus ``spare`` free rows, rounded up (as real models do)."""
    rows = len(tokenizer) + spare
    return -(-rows // multiple) * multiple


def _whisper_feature_extractor(chunk_length: int) -> WhisperFeatureExtractor:
    """Whisper log-mel features with the real Qwen audio values (128 mel bins at 16 kHz)."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(
        feature_size=128,
        sampling_rate=16000,
        hop_length=160,
        chunk_length=chunk_length,
        n_fft=400,
        return_attention_mask=True,
    )


def _seed() -> None:
    """Reset every random generator a build uses, so weights only depend on the recipe."""
    import torch

    torch.manual_seed(SEED)


# --------------------------------------------------------------------------------------------------------
# Qwen2.5-Omni
# --------------------------------------------------------------------------------------------------------

QWEN2_5_OMNI_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)

# The real Qwen2.5-Omni prompt format. Content is a string or a list of typed parts.
QWEN2_5_OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + QWEN2_5_OMNI_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Codec ids that Qwen2_5OmniForConditionalGeneration.generate hard-codes (8292..8296) need vocab 8448.
_OMNI_TALKER_VOCAB = 8448
# A random BigVGAN outputs near-silence (RMS ~2e-7); this gain on its last conv (the output is linear in
# it before the [-1, 1] clamp) brings generated speech to RMS ~0.05, peaks ~0.2: audible, never clipped.
_OMNI_VOCODER_GAIN = 2.5e5
_OMNI_SPEAKERS = ("Chelsie", "Ethan")  # the real model's speakers; the first is generate()'s default


def _qwen_vision_processors(
    image_max_pixels: int, video_max_pixels: int
) -> tuple[Qwen2VLImageProcessor, Qwen2VLVideoProcessor]:
    """Qwen2-VL image and video processors (patch 14, merge 2, temporal 2, CLIP mean/std), small sizes."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    common: dict[str, Any] = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=image_max_pixels, **common)
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=56 * 56,
        max_pixels=video_max_pixels,
        min_frames=2,
        max_frames=16,
        fps=2.0,
        cap_pixels_per_frame=True,  # the reference (qwen-vl-utils) behaviour; unset, 5.23 warns on every call
        **common,
    )
    return image_processor, video_processor


def build_qwen2_5_omni(out: Path) -> None:
    """Qwen2.5-Omni: thinker (text 64 wide, audio and vision towers) + talker + token2wav + speakers."""
    import torch
    from transformers import (
        GenerationConfig,
        PreTrainedConfig,
        Qwen2_5OmniConfig,
        Qwen2_5OmniForConditionalGeneration,
        Qwen2_5OmniProcessor,
    )

    tokenizer = build_qwen_tokenizer()
    tid = tokenizer.convert_tokens_to_ids
    rows = _embedding_rows(tokenizer)
    # Ids past the tokenizer, in the embedding's spare rows, as in the real model.
    tts_text_pad, tts_text_start, tts_text_end = rows - 3, rows - 2, rows - 1
    speaker_bos = {name: rows - 8 + i for i, name in enumerate(_OMNI_SPEAKERS)}

    media_ids = {
        "audio_token_index": tid("<|AUDIO|>"),
        "image_token_index": tid("<|IMAGE|>"),
        "video_token_index": tid("<|VIDEO|>"),
        "audio_start_token_id": tid("<|audio_bos|>"),
        "audio_end_token_id": tid("<|audio_eos|>"),
        "vision_start_token_id": tid("<|vision_bos|>"),
        "vision_end_token_id": tid("<|vision_eos|>"),
    }
    eos_ids = [tid("<|im_end|>"), tid("<|endoftext|>")]
    mrope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}  # head_dim 16

    thinker = {
        **media_ids,
        "user_token_id": _single_token_id(tokenizer, "user"),
        "text_config": {
            "vocab_size": rows,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rope_parameters": mrope,
            "tie_word_embeddings": False,
            "pad_token_id": tid("<|endoftext|>"),
            "eos_token_id": tid("<|im_end|>"),
        },
        "audio_config": {
            "num_mel_bins": 128,
            "d_model": 32,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "output_dim": 64,
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "out_hidden_size": 64,
        },
    }
    talker = {
        **media_ids,
        "vocab_size": _OMNI_TALKER_VOCAB,
        "embedding_size": 64,  # the thinker's hidden size
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "rope_parameters": mrope,
        "tts_text_start_token_id": tts_text_start,
        "tts_text_end_token_id": tts_text_end,
        "tts_text_pad_token_id": tts_text_pad,
    }
    token2wav = {
        "dit_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "head_dim": 16,
            "emb_dim": 16,
            "num_embeds": _OMNI_TALKER_VOCAB,  # random codes span the whole talker vocabulary
            "enc_emb_dim": 16,
            "enc_dim": 16,
            "enc_channels": [32, 32, 32, 32, 96],  # the last one is the sum of the middle ones
            "enc_attention_channels": 16,
            "enc_se_channels": 16,
            "look_ahead_layers": [1],
            "look_backward_layers": [0],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "bigvgan_config": {"upsample_initial_channel": 128},  # halved by each of the six upsamplers
    }
    config = Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=token2wav)

    _seed()
    model = Qwen2_5OmniForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.token2wav.code2wav_bigvgan_model.conv_post.weight.mul_(_OMNI_VOCODER_GAIN)
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=tid("<|endoftext|>"))
    model.save_pretrained(out)

    # spk_dict.pt is mandatory for Qwen2_5OmniForConditionalGeneration.from_pretrained.
    assert isinstance(config.token2wav_config, PreTrainedConfig)  # built from the dict above
    dit = config.token2wav_config.dit_config
    speakers = {
        name: {
            "bos_token": speaker_bos[name],
            "cond": torch.randn(1, dit.enc_emb_dim),
            "ref_mel": torch.randn(1, 32, dit.mel_dim),
        }
        for name in _OMNI_SPEAKERS
    }
    torch.save(speakers, out / "spk_dict.pt")

    image_processor, video_processor = _qwen_vision_processors(
        image_max_pixels=64 * 28 * 28, video_max_pixels=16 * 28 * 28
    )
    processor = Qwen2_5OmniProcessor(
        image_processor=image_processor,
        video_processor=video_processor,
        feature_extractor=_whisper_feature_extractor(chunk_length=300),
        tokenizer=tokenizer,
        chat_template=QWEN2_5_OMNI_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)


# --------------------------------------------------------------------------------------------------------
# Janus
# --------------------------------------------------------------------------------------------------------

_JANUS_BOS = "<｜begin▁of▁sentence｜>"
_JANUS_EOS = "<｜end▁of▁sentence｜>"
_JANUS_PAD = "<｜▁pad▁｜>"
_JANUS_NAMED_TOKENS = {
    "image_token": "<image_placeholder>",
    "boi_token": "<begin_of_image>",
    "eoi_token": "<end_of_image>",
}
_JANUS_SPECIAL_TOKENS = (
    _JANUS_BOS,
    _JANUS_EOS,
    _JANUS_PAD,
    "<|User|>",
    "<|Assistant|>",
    *_JANUS_NAMED_TOKENS.values(),
)

# The real Janus-Pro template (``<|User|>: {text}\n<image_placeholder>\n\n<|Assistant|>:``), extended to
# accept plain-string content.
JANUS_CHAT_TEMPLATE = (
    "{% set seps = ['\n\n', '" + _JANUS_EOS + "'] %}"
    "{% for message in messages %}"
    "{% if message['role'] | lower == 'user' %}<|User|>: "
    "{% elif message['role'] | lower == 'assistant' %}<|Assistant|>: "
    "{% else %}{{ message['role'].capitalize() }}: "
    "{% endif %}"
    "{% if message['content'] is string %}"
    "{{ message['content'] | trim }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{% if not loop.first %}{{ '\n' }}{% endif %}"
    "<image_placeholder>"
    "{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% elif content['type'] == 'text' %}"
    "{% set text = content['text'] %}"
    "{% if loop.first %}{% set text = text.lstrip() %}{% endif %}"
    "{% if loop.last %}{% set text = text.rstrip() %}{% endif %}"
    "{% if not loop.first and message['content'][loop.index0 - 1]['type'] == 'text' %}"
    "{{ ' ' + text }}"
    "{% else %}{{ text }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% if not loop.last or add_generation_prompt %}"
    "{% if message['role'] | lower == 'user' %}{{ seps[0] }}{% else %}{{ seps[1] }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)

# Image path sizes: a 64x64 input (8x8 patches of 8 px) and 64 image tokens decoded to a 64x64 output.
_JANUS_IMAGE_SIZE = 64
_JANUS_PATCH_SIZE = 8


def build_janus_tokenizer():
    """A generic fast byte-level BPE tokenizer that prepends BOS, with the Janus specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab, merges = _train_byte_level_bpe(pre_tokenizer)
    vocab = _with_specials(vocab, _JANUS_SPECIAL_TOKENS)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{_JANUS_BOS} $A",
        pair=f"{_JANUS_BOS} $A {_JANUS_BOS} $B",
        special_tokens=[(_JANUS_BOS, vocab[_JANUS_BOS])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_JANUS_BOS,
        eos_token=_JANUS_EOS,
        pad_token=_JANUS_PAD,
        model_max_length=16384,
        extra_special_tokens=dict(_JANUS_NAMED_TOKENS),
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|User|>", "<|Assistant|>"]})
    return tokenizer


def build_janus(out: Path) -> None:
    """Janus: SigLIP-style vision tower + Llama text model + VQ-VAE image generation path, all tiny."""
    from transformers import (
        GenerationConfig,
        JanusConfig,
        JanusForConditionalGeneration,
        JanusImageProcessor,
        JanusProcessor,
    )

    tokenizer = build_janus_tokenizer()
    tid = tokenizer.convert_tokens_to_ids
    num_patches = _JANUS_IMAGE_SIZE // _JANUS_PATCH_SIZE
    num_image_tokens = num_patches**2
    hidden = 64

    config = JanusConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": _embedding_rows(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 16384,
            "bos_token_id": tid(_JANUS_BOS),
            "eos_token_id": tid(_JANUS_EOS),
            "pad_token_id": tid(_JANUS_PAD),
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": _JANUS_IMAGE_SIZE,
            "patch_size": _JANUS_PATCH_SIZE,
            "projection_dim": hidden,
            "num_image_tokens": num_image_tokens,
        },
        vq_config={
            "embed_dim": 8,
            "num_embeddings": 512,  # image codebook
            "latent_channels": 32,
            "base_channels": 32,  # GroupNorm(32) needs multiples of 32
            "channel_multiplier": [1, 1, 1, 1],  # three 2x upsamplers: 8x8 tokens -> 64x64 pixels
            "num_res_blocks": 1,
            "projection_dim": hidden,
            "image_token_embed_dim": hidden,
        },
        image_token_id=tid(_JANUS_NAMED_TOKENS["image_token"]),
    )

    _seed()
    model = JanusForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tid(_JANUS_BOS),
        eos_token_id=tid(_JANUS_EOS),
        pad_token_id=tid(_JANUS_PAD),
        # Image generation reads the begin-of-image id from here and applies classifier-free guidance.
        generation_kwargs={"boi_token_id": tid(_JANUS_NAMED_TOKENS["boi_token"])},
        guidance_scale=5.0,
    )
    model.save_pretrained(out)

    image_processor = JanusImageProcessor(
        size={"height": _JANUS_IMAGE_SIZE, "width": _JANUS_IMAGE_SIZE},
        min_size=14,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=JANUS_CHAT_TEMPLATE,
        use_default_system_prompt=False,
        num_image_tokens=num_image_tokens,
    )
    processor.save_pretrained(out)


# --------------------------------------------------------------------------------------------------------
# Qwen2-Audio
# --------------------------------------------------------------------------------------------------------

# The real Qwen2-Audio-Instruct prompt format.
QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_audio(out: Path) -> None:
    """Qwen2-Audio: Whisper-style audio encoder + projector + Qwen2 text model, all tiny."""
    from transformers import (
        GenerationConfig,
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
    )

    tokenizer = build_qwen_tokenizer()
    tid = tokenizer.convert_tokens_to_ids
    config = Qwen2AudioConfig(
        text_config={
            "model_type": "qwen2",
            "vocab_size": _embedding_rows(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 8192,
            "pad_token_id": tid("<|endoftext|>"),
            "eos_token_id": tid("<|im_end|>"),
        },
        audio_config={
            "model_type": "qwen2_audio_encoder",
            "num_mel_bins": 128,
            "d_model": 32,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
        },
        audio_token_index=tid("<|AUDIO|>"),
    )

    _seed()
    model = Qwen2AudioForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[tid("<|im_end|>"), tid("<|endoftext|>")], pad_token_id=tid("<|endoftext|>")
    )
    model.save_pretrained(out)

    processor = Qwen2AudioProcessor(
        feature_extractor=_whisper_feature_extractor(chunk_length=30),
        tokenizer=tokenizer,
        chat_template=QWEN2_AUDIO_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)


# --------------------------------------------------------------------------------------------------------
# Gemma 3n
# --------------------------------------------------------------------------------------------------------

# The real Gemma 3 / 3n prompt format: BOS, a system message folded into the first user turn, roles that
# alternate user/model, each media part as its soft token (the processor expands it to
# ``\n\n<start_of_image><image_soft_token>*n<end_of_image>\n\n``, and the same for audio).
GEMMA3N_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'audio' -%}{{ '<audio_soft_token>' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<image_soft_token>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")
# Gemma 3n's id layout, scaled down: text tokens below _GEMMA3N_TEXT_VOCAB (the per-layer embedding's
# size; unused slots filled as the real vocabulary does), then a block of vision ids (end-of-image, image
# soft token, spare) and a block of audio ids, each embedded by its own multimodal embedder.
_GEMMA3N_TEXT_VOCAB = 1024
_GEMMA3N_MM_VOCAB = 8  # ids per multimodal block (the real model has 128)
_GEMMA3N_VISION_TOKENS = ("<end_of_image>", "<image_soft_token>")
_GEMMA3N_AUDIO_TOKENS = ("<end_of_audio>", "<audio_soft_token>")
_GEMMA3N_NAMED_TOKENS = {
    "image_token": "<image_soft_token>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "audio_token": "<audio_soft_token>",
    "boa_token": "<start_of_audio>",
    "eoa_token": "<end_of_audio>",
}
_GEMMA3N_IMAGE_SIZE = 64  # pixels; the encoder's fusion adapter pools to 2x2 = 4 soft tokens per image
_GEMMA3N_IMAGE_TOKENS = 4
_GEMMA3N_AUDIO_TOKENS_PER_CLIP = 8  # soft tokens per audio clip (the real model has 188)


def build_gemma3n_tokenizer():
    """Gemma's tokenizer: a BPE over ``▁``-marked words with byte fallback, and Gemma 3n's special ids.

    Trained on the fixed corpus (words split at ``▁``, as sentencepiece splits at whitespace), then wrapped
    in transformers' ``GemmaTokenizer(vocab=..., merges=...)``.
    """
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next", invert=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE + 256,
        special_tokens=[*_GEMMA_SPECIALS, *(f"<0x{i:02X}>" for i in range(256))],
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)
    model = json.loads(backend.to_str())["model"]
    vocab, merges = dict(model["vocab"]), [tuple(pair) for pair in model["merges"]]
    vocab = _with_specials(vocab, ("<start_of_image>", "<start_of_audio>"))
    vocab = _with_specials(vocab, [f"<unused{i}>" for i in range(len(vocab), _GEMMA3N_TEXT_VOCAB)])
    for block in (_GEMMA3N_VISION_TOKENS, _GEMMA3N_AUDIO_TOKENS):
        start = len(vocab) + len(block)
        spare = [f"<unused{i}>" for i in range(start, len(vocab) + _GEMMA3N_MM_VOCAB)]
        vocab = _with_specials(vocab, [*block, *spare])
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # tokenizers' BPE takes (left, right) pairs; the stub says str
        extra_special_tokens=dict(_GEMMA3N_NAMED_TOKENS),
    )
    tokenizer.add_tokens([AddedToken(token, special=True) for token in ("<start_of_turn>", "<end_of_turn>")])
    return tokenizer


def build_gemma3n(out: Path) -> None:
    """Gemma 3n: MobileNetV5 vision encoder (timm), USM-style conformer audio encoder, and the Gemma 3n
    text model (AltUp, LAuReL, per-layer inputs, KV sharing, sliding + full attention), all tiny."""
    from transformers import (
        Gemma3nAudioFeatureExtractor,
        Gemma3nConfig,
        Gemma3nForConditionalGeneration,
        Gemma3nProcessor,
        GenerationConfig,
        SiglipImageProcessor,
    )

    tokenizer = build_gemma3n_tokenizer()
    tid = tokenizer.convert_tokens_to_ids
    eos_ids = [tid("<eos>"), tid("<end_of_turn>")]
    config = Gemma3nConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "vocab_size_per_layer_input": _GEMMA3N_TEXT_VOCAB,
            "hidden_size": 64,
            "hidden_size_per_layer_input": 8,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "sliding_window": 64,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "num_kv_shared_layers": 2,  # the last two layers reuse the first two's keys and values
            "laurel_rank": 8,
            "altup_num_inputs": 2,
            "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0],
            "max_position_embeddings": 8192,
            "pad_token_id": tid("<pad>"),
            "eos_token_id": eos_ids,
            "bos_token_id": tid("<bos>"),
        },
        vision_config={
            "architecture": "mobilenetv5_300m_enc",
            # The real encoder at 1/16 of its width; its fusion adapter always outputs 2048 channels.
            "model_args": {"channel_multiplier": 0.0625, "msfa_output_resolution": 2},
            "hidden_size": 2048,
            "vocab_size": _GEMMA3N_MM_VOCAB,
            "vocab_offset": _GEMMA3N_TEXT_VOCAB,
        },
        audio_config={
            "vocab_size": _GEMMA3N_MM_VOCAB,
            "vocab_offset": _GEMMA3N_TEXT_VOCAB + _GEMMA3N_MM_VOCAB,
            "input_feat_size": 128,
            "hidden_size": 32,
            "conf_num_attention_heads": 2,
            "conf_num_hidden_layers": 2,
            "sscp_conv_channel_size": [8, 8],
        },
        audio_soft_tokens_per_image=_GEMMA3N_AUDIO_TOKENS_PER_CLIP,
        vision_soft_tokens_per_image=_GEMMA3N_IMAGE_TOKENS,
        boi_token_id=tid("<start_of_image>"),
        eoi_token_id=tid("<end_of_image>"),
        image_token_id=tid("<image_soft_token>"),
        boa_token_id=tid("<start_of_audio>"),
        eoa_token_id=tid("<end_of_audio>"),
        audio_token_id=tid("<audio_soft_token>"),
    )

    _seed()
    model = Gemma3nForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tid("<bos>"), eos_token_id=eos_ids, pad_token_id=tid("<pad>")
    )
    model.save_pretrained(out)

    image_processor = SiglipImageProcessor(
        size={"height": _GEMMA3N_IMAGE_SIZE, "width": _GEMMA3N_IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),  # the real values: 128 mel bins at 16 kHz
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3N_CHAT_TEMPLATE,
        audio_seq_length=_GEMMA3N_AUDIO_TOKENS_PER_CLIP,
        image_seq_length=_GEMMA3N_IMAGE_TOKENS,
    )
    processor.save_pretrained(out)
