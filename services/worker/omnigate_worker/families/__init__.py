"""Model families: what each family of any-to-any models adds to the generic engine, one module each.

The engine (``engine/transformers_engine.py``) loads any model through transformers' standard path and drives it
through ``generate`` and its own batched decode loop. What differs between families lives here, behind the
small interface of ``base.ModelFamily``: the module whose ``generate`` writes the text, the generate
arguments, output modalities and speakers, request checks, input quirks, and speech or image output.

- ``generic.py``      any model transformers loads: text out through ``generate``.
- ``qwen_omni.py``    Qwen2.5-Omni: thinker and talker arguments, speech (``generate`` path and the pipeline).
- ``qwen3_omni.py``   Qwen3-Omni: MoE thinker and talker arguments, speech through ``generate``.
- ``janus.py``        Janus-style image output.
- ``qwen2_audio.py``  Qwen2-Audio: audio in, text out.
- ``gemma3n.py``      Gemma 3n: image and audio in, text out, one request at a time.
- ``voxtral.py``      Voxtral: audio in, text out; inputs through mistral-common's chat request.

A new family is one module with a ``ModelFamily`` subclass listed in ``FAMILIES`` below; the engine needs no
edit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from omnigate_worker.families.base import ModelFamily
from omnigate_worker.families.gemma3n import Gemma3nFamily
from omnigate_worker.families.generic import GenericFamily
from omnigate_worker.families.janus import JanusFamily
from omnigate_worker.families.qwen2_audio import Qwen2AudioFamily
from omnigate_worker.families.qwen3_omni import Qwen3OmniFamily
from omnigate_worker.families.qwen_omni import QwenOmniFamily
from omnigate_worker.families.voxtral import VoxtralFamily

if TYPE_CHECKING:
    from omnigate_worker.settings import WorkerSettings

# Checked in order; the generic path serves what none of them claims.
FAMILIES: tuple[type[ModelFamily], ...] = (
    Qwen3OmniFamily,
    QwenOmniFamily,
    JanusFamily,
    Qwen2AudioFamily,
    Gemma3nFamily,
    VoxtralFamily,
)


def family_for(model: Any, processor: Any, settings: WorkerSettings) -> ModelFamily:
    for family in FAMILIES:
        if family.matches(model):
            return family(model, processor, settings)
    return GenericFamily(model, processor, settings)


__all__ = ["FAMILIES", "ModelFamily", "family_for"]
