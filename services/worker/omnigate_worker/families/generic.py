"""The generic path: any model transformers' ``AutoModelForMultimodalLM`` (or the image-text and audio
classes) loads, text out through its own ``generate``; batched by the engine when its cache allows."""

from __future__ import annotations

from omnigate_worker.families.base import ModelFamily


class GenericFamily(ModelFamily):
    """Everything ``ModelFamily`` does, nothing more."""
