"""Tiny Qwen3-Omni (``Qwen3OmniMoeForConditionalGeneration``): thinker + talker + code predictor + code2wav.

The real architecture at toy sizes: a MoE thinker (Qwen3-VL-style vision tower with deepstack features, a
windowed audio encoder), a MoE talker whose code predictor writes the residual codec groups, and the
causal-convolution code2wav vocoder (1920 samples per code: 24 kHz at 12.5 codes per second).

The token layout follows the real checkpoint's, scaled down:

- The tokenizer carries Qwen3's special tokens (``<|vision_start|>``, ``<|image_pad|>``, ``<|audio_pad|>``,
  ...) and Qwen3-Omni's talker text tokens (``<tts_pad>``, ``<tts_text_bos>``, ``<tts_text_eod>``), so every
  id in the config (im_start/im_end, system/user/assistant, tts pad/bos/eos, media tokens) is a real token.
- The talker vocabulary is the codebook plus 1024 ids: ``generate`` suppresses the top 1024 (except codec
  end-of-speech) while sampling, so the codes it writes always fit the codebook; the codec control ids and
  the speakers sit in that top block at the real checkpoint's offsets.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from omnigate_tiny.builders import (
    _embedding_rows,
    _qwen_vision_processors,
    _seed,
    _single_token_id,
    _train_byte_level_bpe,
    _whisper_feature_extractor,
    _with_specials,
)

# Qwen3's special tokens in the real tokenizer's order (a subset), then Qwen3-Omni's audio and talker tokens.
QWEN3_OMNI_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
)
# The named tokens Qwen3OmniMoeProcessor reads from the tokenizer.
QWEN3_OMNI_NAMED_TOKENS = {
    "image_token": "<|image_pad|>",
    "audio_token": "<|audio_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}

# The Qwen3-Omni prompt format: no default system message; each turn ``<|im_start|>{role}\n ...
# <|im_end|>\n``; image ``<|vision_start|><|image_pad|><|vision_end|>``, audio
# ``<|audio_start|><|audio_pad|><|audio_end|>``, video ``<|vision_start|><|video_pad|><|vision_end|>``;
# generation prompt ``<|im_start|>assistant\n``. Content is a string or a list of typed parts.
QWEN3_OMNI_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Codec layout: the real checkpoint has a 2048-code book, a 3072-id talker vocabulary and its control ids
# at 2148.. (pad, bos, eos, ..., nothink, think bos/eos) and speakers at 2301..; the tiny one keeps the offsets
# above its codebook.
_CODEBOOK = 64
_TALKER_VOCAB = _CODEBOOK + 1024  # generate() suppresses [vocab - 1024, vocab) but the codec eos
_CODEC_IDS = {
    "codec_pad_id": _CODEBOOK + 100,
    "codec_bos_id": _CODEBOOK + 101,
    "codec_eos_token_id": _CODEBOOK + 102,
    "codec_nothink_id": _CODEBOOK + 107,
    "codec_think_bos_id": _CODEBOOK + 108,
    "codec_think_eos_id": _CODEBOOK + 109,
}
# generate() looks speakers up by their lower-cased name; "ethan" is its default.
QWEN3_OMNI_SPEAKERS = {"chelsie": _CODEBOOK + 253, "ethan": _CODEBOOK + 254}
_CODE_GROUPS = 4  # codec groups per step: the talker writes the first, its code predictor the rest
# A random code2wav is near-silent; this gain on its last convolution makes generated speech audible
# (the output is linear in it before code2wav's [-1, 1] clamp).
_CODE2WAV_GAIN = 5e5


def _with_whole_words(
    vocab: dict[str, int], merges: list[tuple[str, str]], words: Iterable[str]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Append the merges that make each of ``words`` one BPE token (lowest priority, after all others).

    Qwen3-Omni's ``generate`` finds the reply by the ids of ``<|im_start|>`` followed by one ``assistant``
    token (and the talker's turns by one ``user`` token), as in the real vocabulary; the tiny BPE's 512
    entries split ``assistant`` into pieces, so the missing merges are added here.
    """
    from tokenizers import Tokenizer, models

    vocab, merges = dict(vocab), list(merges)
    for word in words:
        pieces = Tokenizer(models.BPE(vocab=vocab, merges=merges)).encode(word).tokens
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    return vocab, merges


def build_qwen3_omni_tokenizer():
    """A Qwen2 byte-level BPE (the shared corpus and pre-tokenizer) with Qwen3-Omni's special tokens."""
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
    vocab, merges = _with_whole_words(vocab, merges, ("system", "user", "assistant"))
    tokenizer = Qwen2Tokenizer(
        vocab=_with_specials(vocab, QWEN3_OMNI_SPECIAL_TOKENS),
        merges=merges,  # type: ignore[arg-type]  # tokenizers' BPE takes (left, right) pairs; the stub says str
        unk_token=None,  # type: ignore[arg-type]  # no unknown token (byte-level BPE); the stub says str
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        extra_special_tokens=dict(QWEN3_OMNI_NAMED_TOKENS),
    )
    tokenizer.add_tokens([AddedToken(token, special=True) for token in QWEN3_OMNI_SPECIAL_TOKENS])
    return tokenizer


def build_qwen3_omni(out: Path) -> None:
    """Qwen3-Omni: MoE thinker (text 64 wide, audio and vision towers), MoE talker, code predictor, code2wav."""
    import torch
    from transformers import (
        GenerationConfig,
        PreTrainedConfig,
        Qwen3OmniMoeConfig,
        Qwen3OmniMoeForConditionalGeneration,
        Qwen3OmniMoeProcessor,
    )

    tokenizer = build_qwen3_omni_tokenizer()
    tid = tokenizer.convert_tokens_to_ids
    rows = _embedding_rows(tokenizer)
    media_ids = {
        "audio_token_id": tid("<|audio_pad|>"),
        "image_token_id": tid("<|image_pad|>"),
        "video_token_id": tid("<|video_pad|>"),
        "audio_start_token_id": tid("<|audio_start|>"),
        # read by the rope index of thinker and talker; a declared field of the talker config only
        "vision_start_token_id": tid("<|vision_start|>"),
    }
    eos_ids = [tid("<|im_end|>"), tid("<|endoftext|>")]
    moe = {"num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1}

    thinker = {
        **media_ids,
        "user_token_id": _single_token_id(tokenizer, "user"),
        "text_config": {
            **moe,
            "vocab_size": rows,
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            # head_dim 16: the sections sum to 8; interleaved as in the real config
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [2, 3, 3],
                "interleaved": True,
            },
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
            "downsample_hidden_size": 16,
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,  # the shared Qwen2-VL processors cut 14-pixel patches
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 256,  # a 16x16 grid, interpolated to each image's
            "deepstack_visual_indexes": [0],
        },
    }
    talker = {
        **media_ids,
        **_CODEC_IDS,
        "thinker_hidden_size": 64,
        "accept_hidden_layer": 1,
        "num_code_groups": _CODE_GROUPS,
        "speaker_id": dict(QWEN3_OMNI_SPEAKERS),
        "spatial_merge_size": 2,  # read by the talker's rope index, not a declared field
        "text_config": {
            **moe,
            "vocab_size": _TALKER_VOCAB,
            "hidden_size": 32,
            "intermediate_size": 64,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 32,  # read by the talker's MoE block, not a declared field
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [2, 3, 3],
                "interleaved": True,
            },
        },
        "code_predictor_config": {
            "vocab_size": _CODEBOOK,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "num_code_groups": _CODE_GROUPS,
        },
    }
    code2wav = {
        "codebook_size": _CODEBOOK,
        "num_quantizers": _CODE_GROUPS,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "decoder_dim": 64,  # halved by each of the four decoder blocks
    }
    config = Qwen3OmniMoeConfig(
        thinker_config=thinker,
        talker_config=talker,
        code2wav_config=code2wav,
        im_start_token_id=tid("<|im_start|>"),
        im_end_token_id=tid("<|im_end|>"),
        tts_pad_token_id=tid("<tts_pad>"),
        tts_bos_token_id=tid("<tts_text_bos>"),
        tts_eos_token_id=tid("<tts_text_eod>"),
        system_token_id=_single_token_id(tokenizer, "system"),
        user_token_id=_single_token_id(tokenizer, "user"),
        assistant_token_id=_single_token_id(tokenizer, "assistant"),
    )

    _seed()
    model = Qwen3OmniMoeForConditionalGeneration(config).eval()
    with torch.no_grad():
        # transformers 5.23 leaves the talker's per-expert linear layers uninitialised (torch.empty memory):
        # give them seeded values, or the weights (and every output) change from build to build.
        assert isinstance(config.talker_config, PreTrainedConfig)  # built from the dict above
        std = config.talker_config.initializer_range
        for name, param in model.talker.named_parameters():
            if ".mlp.experts." in name:
                param.normal_(0.0, std)
        model.code2wav.decoder[-1].conv.weight.mul_(_CODE2WAV_GAIN)
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=tid("<|endoftext|>"))
    model.save_pretrained(out)

    image_processor, video_processor = _qwen_vision_processors(
        image_max_pixels=64 * 28 * 28, video_max_pixels=16 * 28 * 28
    )
    processor = Qwen3OmniMoeProcessor(
        image_processor=image_processor,
        video_processor=video_processor,
        feature_extractor=_whisper_feature_extractor(chunk_length=300),
        tokenizer=tokenizer,
        chat_template=QWEN3_OMNI_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
