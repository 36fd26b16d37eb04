"""Tiny Voxtral (``VoxtralForConditionalGeneration``): Whisper-style audio encoder + projector + Llama.

Voxtral's processor has no tokenizer of the ``tokenizers`` library: it tokenizes through mistral-common
(``MistralCommonBackend`` over a ``tekken.json`` vocabulary), whose chat and transcription requests also
place the audio tokens. mistral-common has no writer for ``tekken.json``, so this module writes one in the
format its loader reads (``Tekkenizer.from_file``: the ``TokenInfo`` / ``SpecialTokenInfo`` / ``TekkenConfig``
records and an ``AudioConfig``), and checks it by loading it back with mistral-common's
``MistralTokenizer.from_file`` before anything else is built on it:

- the regular vocabulary is a byte-level BPE trained by tiktoken's own trainer (Tekken runs on tiktoken)
  on the shared in-code corpus with Tekken's split pattern: ranks 0-255 are the bytes, then the merges;
- the special tokens: mistral-common's 20 classic control tokens (``<unk> <s> </s> [INST] [/INST] ...``)
  at 0-19, ``[AUDIO]`` at 24 (``VoxtralProcessor`` hard-codes that id), ``[BEGIN_AUDIO]`` 25,
  ``[TRANSCRIBE]`` 34, fillers ``<SPECIAL_n>`` between; 64 of them where the real vocabulary has 1000.
  Version v7, the first whose instruct tokenizer takes audio (mistral-common allows a system prompt
  beside audio only from v13 on);
- the audio config is the real one (16 kHz, 12.5 audio tokens per second, 128 mel bins, hop 160, window
  400, audio padded to 30 s chunks: 375 ``[AUDIO]`` tokens per chunk, the encoder's 3000 frames / 8).

The model's vocabulary is exactly the tokenizer's (as the real checkpoint's 131072), so any id a random model
writes decodes.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from omnigate_tiny.builders import _BPE_VOCAB_SIZE, _CORPUS, _seed, _whisper_feature_extractor

# Tekken's pre-tokenizer split pattern (tiktoken ``pat_str``), as in every published ``tekken.json``.
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NUM_SPECIAL_TOKENS = 64  # the real vocabulary reserves 1000
TEKKEN_FILE = "tekken.json"
# Voxtral's transcription prompt ends ``lang:xx[TRANSCRIBE]``: the corpus line makes those pieces short.
_VOXTRAL_CORPUS = (*_CORPUS, "lang:en lang:fr lang:de Transcribe this audio. Listen and answer.")


def _special_tokens() -> list[dict[str, Any]]:
    """The real Voxtral layout: mistral-common's first 20 control tokens, then the audio ones."""
    from mistral_common.tokens.tokenizers.base import SpecialTokens
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    placed = {token["rank"]: token["token_str"] for token in Tekkenizer.DEPRECATED_SPECIAL_TOKENS}
    placed.update(
        {
            24: SpecialTokens.audio.value,
            25: SpecialTokens.begin_audio.value,
            32: SpecialTokens.args.value,
            33: SpecialTokens.call_id.value,
            34: SpecialTokens.transcribe.value,
        }
    )
    return [
        {
            "rank": rank,
            "token_str": placed.get(rank, Tekkenizer.SPECIAL_TOKEN_TEMPLATE.format(id=rank)),
            "is_control": True,
        }
        for rank in range(_NUM_SPECIAL_TOKENS)
    ]


def _audio_config() -> dict[str, Any]:
    """The real Voxtral audio section, built (and so checked) with mistral-common's own dataclasses."""
    from mistral_common.tokens.tokenizers.audio import (
        AudioConfig,
        AudioSpectrogramConfig,
        TranscriptionFormat,
    )

    config = AudioConfig(
        sampling_rate=16000,
        frame_rate=12.5,
        encoding_config=AudioSpectrogramConfig(num_mel_bins=128, hop_length=160, window_size=400),
        chunk_length_s=30.0,
        transcription_format=TranscriptionFormat.INSTRUCT,
    )
    fields = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
    fields["audio_encoding_config"] = fields.pop("encoding_config")  # the file's name for it
    fields["transcription_format"] = str(config.transcription_format.value)
    return fields


def build_tekken_json(path: Path) -> None:
    """Writes a tiny ``tekken.json`` (with audio) and checks that mistral-common loads it."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from tiktoken._educational import bpe_train  # tiktoken's reference BPE trainer (pure Python)

    ranks = bpe_train("\n".join(_VOXTRAL_CORPUS), _BPE_VOCAB_SIZE, TEKKEN_PATTERN, visualise=None)
    vocab = []
    for piece, rank in sorted(ranks.items(), key=lambda item: item[1]):
        try:
            text: str | None = piece.decode("utf-8")
        except UnicodeDecodeError:
            text = None  # a piece of a multi-byte character, as in the real file
        vocab.append(
            {"rank": rank, "token_bytes": base64.b64encode(piece).decode("ascii"), "token_str": text}
        )
    data = {
        "config": {
            "pattern": TEKKEN_PATTERN,
            "num_vocab_tokens": len(vocab),
            "default_vocab_size": len(vocab) + _NUM_SPECIAL_TOKENS,
            "default_num_special_tokens": _NUM_SPECIAL_TOKENS,
            "version": "v7",
        },
        "vocab": vocab,
        "special_tokens": _special_tokens(),
        "audio": _audio_config(),
    }
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    MistralTokenizer.from_file(str(path))  # raises on anything its loader would refuse


def build_voxtral(out: Path) -> None:
    """Voxtral: audio encoder 32 wide (2 layers), projector, Llama text model 64 wide (2 layers)."""
    # mistral-common logs the vocabulary's sizes at INFO each time it loads one
    quiet = logging.getLogger("mistral_common")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        _build(out)
    finally:
        quiet.setLevel(level)


def _build(out: Path) -> None:
    from mistral_common.tokens.tokenizers.base import SpecialTokens
    from transformers import (
        GenerationConfig,
        VoxtralConfig,
        VoxtralForConditionalGeneration,
        VoxtralProcessor,
    )
    from transformers.tokenization_mistral_common import MistralCommonBackend

    with tempfile.TemporaryDirectory() as scratch:
        tekken = Path(scratch) / TEKKEN_FILE
        build_tekken_json(tekken)
        tokenizer = MistralCommonBackend(tokenizer_path=tekken)
        tekken_vocab = tokenizer.tokenizer.instruct_tokenizer.tokenizer  # mistral-common's Tekkenizer
        rows = tekken_vocab.n_words  # the model's vocabulary is the tokenizer's, as in the real checkpoint
        bos, eos, pad = tekken_vocab.bos_id, tekken_vocab.eos_id, tekken_vocab.pad_id
        audio = tekken_vocab.get_special_token(SpecialTokens.audio.value)
        config = VoxtralConfig(
            audio_config={
                "hidden_size": 32,
                "intermediate_size": 128,  # also the width the projector reads: 4 frames of 32
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_mel_bins": 128,
                "max_source_positions": 1500,  # 3000 mel frames (30 s) after the stride-2 convolution
            },
            text_config={
                "model_type": "llama",
                "vocab_size": rows,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "max_position_embeddings": 8192,
                "bos_token_id": bos,
                "eos_token_id": eos,
                "pad_token_id": pad,
            },
            audio_token_id=audio,
        )

        _seed()
        model = VoxtralForConditionalGeneration(config).eval()
        model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
        model.save_pretrained(out)

        processor = VoxtralProcessor(
            feature_extractor=_whisper_feature_extractor(chunk_length=30), tokenizer=tokenizer
        )
        processor.save_pretrained(out)  # copies tekken.json beside the configs
