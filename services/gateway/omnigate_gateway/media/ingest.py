"""Turns a request's media references into decoded media: fetch (or take inline), then decode.

Fetching is async; decoding runs on a bounded thread pool (``decode_threads``) so it never blocks the
event loop. All items of a request are fetched and decoded concurrently; the first failure cancels the
rest. The whole of it runs under the request's deadline, and each decode under ``max_decode_s``: when the
request's task is cancelled (its client went away, or a sibling item failed) or a deadline passes, fetches
are abandoned at once and running decodes stop at their next packet or block (``StopSignal``).

Repeated media is served from the ``MediaCache`` (decoded results by content hash; URLs by their
validators and freshness). Pictures are bounded by what the model's processor keeps of them (``resize``)
while they are decoded, so a 4K image or a 1080p video never travels to the worker at full size.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager

from opentelemetry.trace import Span

from omnigate import tracing
from omnigate.conversation import ContentPart, Modality, ModelInfo
from omnigate.errors import InvalidInput, LimitExceeded, OmnigateError
from omnigate_gateway.convert import IncomingRequest, MediaRef
from omnigate_gateway.errors import DeadlineExceeded
from omnigate_gateway.media.audio import decode_audio
from omnigate_gateway.media.cache import Decoded, DecodeKey, MediaCache, UrlRecord
from omnigate_gateway.media.cancellation import StopSignal
from omnigate_gateway.media.fetch import HTTP_SCHEMES, MediaFetcher, RequestBudget, scheme_of
from omnigate_gateway.media.image import decode_image
from omnigate_gateway.media.video import decode_video
from omnigate_gateway.metrics import GatewayMetrics
from omnigate_gateway.settings import GatewaySettings

_HASH_INLINE_BYTES = 256 * 1024  # smaller bodies are hashed on the event loop, larger ones in a thread


class MediaIngestor:
    def __init__(
        self,
        fetcher: MediaFetcher,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        *,
        cache: MediaCache | None = None,
    ) -> None:
        self._fetcher = fetcher
        self._settings = settings
        self._limits = settings.decode_limits()
        self._metrics = metrics
        self._cache = cache if cache is not None else MediaCache(settings.media_cache_bytes)
        self._executor = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="decode")
        self._max_bytes = {
            Modality.IMAGE: settings.max_image_bytes,
            Modality.AUDIO: settings.max_audio_bytes,
            Modality.VIDEO: settings.max_video_bytes,
        }

    @property
    def cache(self) -> MediaCache:
        return self._cache

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

    async def resolve(
        self, incoming: IncomingRequest, info: ModelInfo, deadline: float | None = None
    ) -> None:
        """Fetches and decodes every media item, filling in its content part.

        ``deadline`` (time.monotonic()) is the request's: past it, everything stops with DeadlineExceeded.
        """
        budget = RequestBudget(self._settings.max_request_media_bytes)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            async with asyncio.timeout(remaining):
                async with asyncio.TaskGroup() as group:
                    for part, ref in incoming.media:
                        group.create_task(self._one(part, ref, incoming, info, budget, deadline))
        except* OmnigateError as errors:
            raise errors.exceptions[0] from None
        except* TimeoutError:
            raise DeadlineExceeded(
                "the request's deadline passed while its media was being fetched and decoded"
            ) from None

    async def _one(
        self,
        part: ContentPart,
        ref: MediaRef,
        incoming: IncomingRequest,
        info: ModelInfo,
        budget: RequestBudget,
        deadline: float | None,
    ) -> None:
        started = time.monotonic()
        modality = ref.modality
        cap = min(self._settings.max_media_bytes, self._max_bytes[modality])
        options = self._decode_options(modality, incoming, info)
        decode_fn = functools.partial(self._decode, modality, options, deadline)
        if ref.url is not None and scheme_of(ref.url) in HTTP_SCHEMES:
            decoded, size = await self._from_url(ref.url, modality, options, budget, cap, decode_fn)
        else:
            if ref.url is not None:
                with _span("gateway.fetch", modality, "data_url"):
                    data = await self._fetcher.fetch(ref.url, budget=budget, max_bytes=cap)
                source = "inline"  # a data: URL
            elif ref.path is not None:
                with _span("gateway.fetch", modality, "path"):
                    data = await asyncio.to_thread(
                        self._fetcher.read_local, ref.path, budget=budget, max_bytes=cap
                    )
                source = "path"
            else:
                source = "inline"
                data = ref.data or b""
                if len(data) > cap:
                    raise LimitExceeded(
                        f"inline {modality.value} is {len(data)} bytes; the limit is {cap} bytes per "
                        f"{modality.value} item"
                    )
                budget.take(len(data))
            self._metrics.media_fetch_latency.labels(modality.value, source).observe(
                time.monotonic() - started
            )
            decoded = await self._decode_cached(data, modality, options, decode_fn)
            size = len(data)
        self._metrics.media_bytes.labels(modality.value).inc(size)
        setattr(part, modality.value, decoded)
        self._metrics.media_latency.labels(modality.value).observe(time.monotonic() - started)

    async def _from_url(
        self,
        url: str,
        modality: Modality,
        options: tuple,
        budget: RequestBudget,
        cap: int,
        decode_fn: Callable,
    ) -> tuple[Decoded, int]:
        """Decoded media behind an http(s) URL, from the cache when the URL is fresh or not modified, and
        the number of bytes transferred for it (0 when the cache answered)."""
        cache = self._cache
        record = cache.get_url(url) if cache.enabled else None
        cached = None
        if record is not None:
            cached = cache.get_decoded(DecodeKey(record.content, modality.value, options))
            if cached is not None and cache.is_fresh(record):
                budget.take(record.encoded_bytes)
                return cached[0], 0
        validators = record.validators if (record is not None and cached is not None) else None
        fetch_started = time.monotonic()
        with _span("gateway.fetch", modality, "url") as span:
            span.set_attribute("omnigate.media.revalidating", bool(validators))
            fetched = await self._fetcher.fetch_media(
                url, budget=budget, validators=validators or None, max_bytes=cap
            )
            span.set_attribute("omnigate.media.bytes", len(fetched.data or b""))
        self._metrics.media_fetch_latency.labels(modality.value, "url").observe(
            time.monotonic() - fetch_started
        )
        if fetched.not_modified and record is not None and cached is not None:
            budget.take(record.encoded_bytes)
            cache.put_url(
                url,
                UrlRecord(
                    record.content,
                    record.encoded_bytes,
                    record.validators,
                    cache.fresh_until(fetched.max_age_s),
                ),
            )
            return cached[0], 0
        data = fetched.data or b""
        content = await self._hash(data) if cache.enabled else ""
        decoded = await self._decode_cached(data, modality, options, decode_fn, content=content)
        if cache.enabled:
            if fetched.no_store or not (fetched.validators or fetched.max_age_s):
                cache.forget_url(url)  # nothing to revalidate with: the next request fetches again
            else:
                cache.put_url(
                    url,
                    UrlRecord(content, len(data), fetched.validators, cache.fresh_until(fetched.max_age_s)),
                )
        return decoded, len(data)

    async def _decode_cached(
        self, data: bytes, modality: Modality, options: tuple, decode_fn: Callable, *, content: str = ""
    ) -> Decoded:
        if not self._cache.enabled:
            return await decode_fn(data)
        key = DecodeKey(content or await self._hash(data), modality.value, options)
        hit = self._cache.get_decoded(key)
        if hit is not None:
            return hit[0]
        decoded = await decode_fn(data)
        self._cache.put_decoded(key, decoded, len(data))
        return decoded

    async def _hash(self, data: bytes) -> str:
        if len(data) <= _HASH_INLINE_BYTES:
            return hashlib.sha256(data).hexdigest()
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: hashlib.sha256(data).hexdigest()
        )

    def _decode_options(self, modality: Modality, incoming: IncomingRequest, info: ModelInfo) -> tuple:
        """Everything besides the bytes that decides the decoded result (part of the cache key)."""
        fit = self._settings.fit_media_to_model
        if modality is Modality.IMAGE:
            return (info.max_image_pixels if fit else 0,)
        if modality is Modality.AUDIO:
            return (info.input_audio_sample_rate,)
        return (
            incoming.video_fps,
            incoming.load_audio_from_video,
            info.input_audio_sample_rate,
            info.max_video_frame_pixels if fit else 0,
        )

    async def _decode(
        self, modality: Modality, options: tuple, deadline: float | None, data: bytes
    ) -> Decoded:
        """Decodes in the pool; cancelling the caller (or a passed deadline) stops the decode thread."""
        limit_s = self._settings.max_decode_s
        stop_at = time.monotonic() + limit_s
        limit = f"the decode time limit of {limit_s:g} s"
        if deadline is not None and deadline < stop_at:
            stop_at, limit = deadline, "the request's deadline"
        stop = StopSignal(stop_at, what=f"decoding the {modality.value}", limit=limit)
        fn: Callable[[], Decoded]
        if modality is Modality.IMAGE:
            fn = functools.partial(decode_image, data, self._limits, fit_pixels=options[0], stop=stop)
        elif modality is Modality.AUDIO:
            fn = functools.partial(decode_audio, data, options[0], self._limits, stop=stop)
        else:
            fps, load_audio, rate, fit_pixels = options
            fn = functools.partial(
                decode_video,
                data,
                fps,
                load_audio,
                rate,
                self._limits,
                fit_pixels=fit_pixels,
                stop=stop,
            )
        try:
            started = time.monotonic()
            with _span("gateway.decode", modality) as span:
                span.set_attribute("omnigate.media.bytes", len(data))
                decoded: Decoded = await asyncio.get_running_loop().run_in_executor(self._executor, fn)
            self._metrics.media_decode_latency.labels(modality.value).observe(time.monotonic() - started)
            return decoded
        except BaseException:
            stop.cancel()  # cancelled (client gone, sibling failed, deadline): the thread stops soon
            raise


def _span(name: str, modality: Modality, source: str | None = None) -> AbstractContextManager[Span]:
    """A span for one media item's fetch or decode, a child of the request's (current) span."""
    attributes = {"omnigate.modality": modality.value}
    if source is not None:
        attributes["omnigate.media.source"] = source
    return tracing.tracer(tracing.GATEWAY).start_as_current_span(name, attributes=attributes)
