"""Omnigate Python SDK: ``OmnigateClient`` (blocking), ``AsyncOmnigateClient`` (asyncio), typed events and
results, ``OmnigateClientError``; and the ``omnigate`` command line built on them."""

from omnigate_client.aio import AsyncGenerationStream, AsyncOmnigateClient
from omnigate_client.client import GenerationStream, OmnigateClient
from omnigate_client.connection import TLSConfig
from omnigate_client.errors import OmnigateClientError
from omnigate_client.protocol import media_part
from omnigate_client.retry import RetryPolicy
from omnigate_client.types import (
    AudioChunk,
    Event,
    GeneratedAudio,
    GenerationResult,
    Image,
    ModelInfo,
    Result,
    Summary,
    TextDelta,
    Timings,
    Usage,
)

__all__ = [
    "AsyncGenerationStream",
    "AsyncOmnigateClient",
    "AudioChunk",
    "Event",
    "GeneratedAudio",
    "GenerationResult",
    "GenerationStream",
    "Image",
    "ModelInfo",
    "OmnigateClient",
    "OmnigateClientError",
    "Result",
    "RetryPolicy",
    "Summary",
    "TLSConfig",
    "TextDelta",
    "Timings",
    "Usage",
    "media_part",
]
