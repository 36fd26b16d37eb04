"""Gemma 3n (``Gemma3nForConditionalGeneration``): image, audio and text in, text out.

Its decoder has sliding-window layers and shares keys and values across layers, so neither the slot runner
nor the dynamic-cache batch can merge its cache (the engine finds this out at warm-up, by checking the
cache, not by name): its requests run through ``generate`` one at a time."""

from __future__ import annotations

from omnigate_worker.families.generic import GenericFamily


class Gemma3nFamily(GenericFamily):
    architectures = ("Gemma3nForConditionalGeneration",)
