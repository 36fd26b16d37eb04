"""Loads a model and its processor through the standard transformers path.

``AutoModelForMultimodalLM.from_pretrained`` + ``AutoProcessor.from_pretrained`` with a hub id or a local
path; on the machine's accelerator (CUDA, MPS, XPU, ...) or the CPU, in bfloat16 on CUDA (float16 on MPS) and
float32 on CPU by default; flash-attention when ``flash_attn`` imports on CUDA, else sdpa.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForMultimodalLM, AutoProcessor
from transformers.utils.import_utils import get_current_accelerator

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Qwen2.5-Omni's talker config (vocabulary: 8448 codec tokens) carries the thinker's token ids for its text,
# vision and audio markers (151647-151861): the talker reads them against the thinker's embeddings, so they
# are right. transformers' config check compares them with the talker's own vocabulary and warns about each
# one at every load, for the real checkpoints and the tiny model alike; nothing a user can or should change.
_TALKER_THINKER_TOKEN_IDS = (
    "tts_text_start_token_id",
    "tts_text_end_token_id",
    "tts_text_pad_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "audio_start_token_id",
    "audio_end_token_id",
)


class _TalkerTokenIdWarnings(logging.Filter):
    """Drops exactly the config warnings above (transformers.configuration_utils); every other passes."""

    PREFIXES = tuple(
        f"Model config: {name} must be `None` or an integer within the vocabulary"
        for name in _TALKER_THINKER_TOKEN_IDS
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIXES))


def silence_known_load_warnings() -> None:
    """Installs the filter above once (idempotent)."""
    config_log = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, _TalkerTokenIdWarnings) for f in config_log.filters):
        config_log.addFilter(_TalkerTokenIdWarnings())


@dataclass
class LoadedModel:
    model: Any  # a transformers model: what the engine reads of it is family-specific
    processor: Any  # its processor (tokenizer, feature extractors), likewise
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str


def resolve_device(name: str) -> torch.device:
    """``auto``: the machine's accelerator as transformers finds it (CUDA, ROCm, Apple MPS, Intel XPU, Ascend
    NPU, ...: ``get_current_accelerator``, torch's accelerator API, the device the transformers guide's
    ``infer_device`` gives; transformers 5.23 has no top-level ``infer_device``), else the CPU."""
    if name == "auto":
        # torch names the accelerator it was built for even where none is present (a CUDA wheel on a
        # CPU-only machine): only one that is available counts.
        accelerator = get_current_accelerator() if accelerator_available() else None
        if accelerator is None or accelerator.type == "cpu":
            return torch.device("cpu")
        if accelerator.index is None and accelerator.type != "mps":
            return torch.device(accelerator.type, 0)
        return accelerator
    return torch.device(name)


def accelerator_available() -> bool:
    return torch.accelerator.is_available()


# Half precision where the device computes it natively; MPS takes float16 (bfloat16 needs recent macOS).
_AUTO_DTYPES = {"cuda": torch.bfloat16, "xpu": torch.bfloat16, "npu": torch.bfloat16, "mps": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return _AUTO_DTYPES.get(device.type, torch.float32)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_attention(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def set_threads(requested: int, device: torch.device) -> int:
    """Intra-op threads. On CPU, oversubscribing cores that preprocessing and the gateway also use costs far
    more than it gives (measured on 2 busy cores: a tiny-model decode step took 1.6 ms with 1 thread and
    55 ms with 2)."""
    if requested > 0:
        torch.set_num_threads(requested)
    elif device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    return torch.get_num_threads()


def load(
    model_id: str,
    device: str,
    dtype: str,
    attn_implementation: str,
    trust_remote_code: bool,
    threads: int = 0,
) -> LoadedModel:
    dev = resolve_device(device)
    set_threads(threads, dev)
    torch_dtype = resolve_dtype(dtype, dev)
    attn = resolve_attention(attn_implementation, dev)
    log.info("loading %s on %s as %s with %s attention", model_id, dev, torch_dtype, attn)
    silence_known_load_warnings()
    model = AutoModelForMultimodalLM.from_pretrained(
        model_id, dtype=torch_dtype, attn_implementation=attn, trust_remote_code=trust_remote_code
    )
    model.to(dev)
    model.eval()
    # Serving never trains: frozen parameters make sure no forward records autograd history, even one that
    # runs outside inference_mode by mistake (on a GPU that history kept one KV-cache copy alive per decode
    # step: +502 MiB per step at batch 64, ../shared/notes/gpu.md).
    model.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    return LoadedModel(
        model=model, processor=processor, device=dev, dtype=torch_dtype, attn_implementation=attn
    )
