"""Turns a request's media references into decoded media: fetch (or take inline), then decode.

Fetching is async; decoding runs on a bounded thread pool so it never blocks the event loop. All items
of a request are fetched and decoded concurrently; the first failure cancels the rest.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor

from omnigate.conversation import Modality, ModelInfo
from omnigate.errors import InvalidInput, LimitExceeded, OmnigateError
from omnigate_gateway import decode
from omnigate_gateway.convert import IncomingRequest, MediaRef
from omnigate_gateway.fetch import MediaFetcher
from omnigate_gateway.metrics import GatewayMetrics
from omnigate_gateway.settings import GatewaySettings


class MediaIngestor:
    def __init__(self, fetcher: MediaFetcher, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self._fetcher = fetcher
        self._settings = settings
        self._limits = settings.decode_limits()
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="decode")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def check(self, incoming: IncomingRequest, info: ModelInfo) -> None:
        """Refuses what the model cannot take, before anything is fetched."""
        request = incoming.request
        for message in request.messages:
            for part in message.content:
                if part.type not in info.input_modalities:
                    raise InvalidInput(
                        f"the model {info.model_id} cannot take {part.type.value} input; it takes "
                        f"{', '.join(m.value for m in info.input_modalities)}"
                    )
        if incoming.load_audio_from_video and Modality.AUDIO not in info.input_modalities:
            raise InvalidInput(
                f"load_audio_from_video is set but the model {info.model_id} cannot take audio"
            )
        if len(incoming.media) > self._settings.max_media_items:
            raise LimitExceeded(
                f"the request has {len(incoming.media)} media items; the limit is {self._settings.max_media_items}"
            )

    async def resolve(self, incoming: IncomingRequest, info: ModelInfo) -> None:
        """Fetches and decodes every media item, filling in its content part."""
        budget = _ByteBudget(self._settings.max_request_media_bytes)
        try:
            async with asyncio.TaskGroup() as group:
                for part, ref in incoming.media:
                    group.create_task(self._one(part, ref, incoming, info, budget))
        except* OmnigateError as errors:
            raise errors.exceptions[0] from None

    async def _one(self, part, ref: MediaRef, incoming: IncomingRequest, info: ModelInfo, budget) -> None:
        started = time.monotonic()
        if ref.url is not None:
            data = await self._fetcher.fetch(ref.url)
        elif ref.path is not None:
            data = await asyncio.to_thread(self._fetcher.read_local, ref.path)
        else:
            data = ref.data
            if len(data) > self._settings.max_media_bytes:
                raise LimitExceeded(
                    f"inline {ref.modality.value} is {len(data)} bytes; the limit is "
                    f"{self._settings.max_media_bytes} bytes per item"
                )
        budget.take(len(data))
        self._metrics.media_bytes.labels(ref.modality.value).inc(len(data))

        if ref.modality is Modality.IMAGE:
            fn = functools.partial(decode.decode_image, data, self._limits)
        elif ref.modality is Modality.AUDIO:
            fn = functools.partial(decode.decode_audio, data, info.input_audio_sample_rate, self._limits)
        else:
            fn = functools.partial(
                decode.decode_video,
                data,
                incoming.video_fps,
                incoming.load_audio_from_video,
                info.input_audio_sample_rate,
                self._limits,
            )
        decoded = await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        setattr(part, ref.modality.value, decoded)
        self._metrics.media_latency.labels(ref.modality.value).observe(time.monotonic() - started)


class _ByteBudget:
    """Encoded bytes of all media of one request together."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0

    def take(self, size: int) -> None:
        self._used += size
        if self._used > self._limit:
            raise LimitExceeded(
                f"the request's media add up to more than {self._limit} bytes, the per-request limit"
            )
