"""Omnigate client: ``OmnigateClient`` and the ``omnigate`` command line."""

from omnigate_client.client import (
    AudioChunk,
    Image,
    OmnigateClient,
    Result,
    Summary,
    TextDelta,
    media_part,
)

__all__ = ["AudioChunk", "Image", "OmnigateClient", "Result", "Summary", "TextDelta", "media_part"]
