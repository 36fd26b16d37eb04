"""Qwen2-Audio (``Qwen2AudioForConditionalGeneration``): audio and text in, text out.

Nothing beyond the generic path: its processor takes ``audio=`` with the chat template's audio
placeholder, and its encoder wants the feature extractor's full 3000 frames, so audio padding is left to
the processor (unlike Qwen2.5-Omni's, see ``qwen_omni.py``)."""

from __future__ import annotations

from omnigate_worker.families.generic import GenericFamily


class Qwen2AudioFamily(GenericFamily):
    architectures = ("Qwen2AudioForConditionalGeneration",)
