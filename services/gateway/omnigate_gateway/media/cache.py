"""A byte-capped LRU of decoded media, so that repeated media is neither fetched nor decoded again.

Two kinds of entries share one byte budget (``max_bytes``), least recently used evicted first:

- decoded media, keyed by the SHA-256 of the encoded bytes plus everything that changes the result of
  decoding them (modality, sampling rate, fps, audio-track choice, the model's pixel bound). Any source
  (URL, inline bytes, local path) with the same bytes and options shares the entry.
- URL records: which content a URL last gave, its validators (ETag / Last-Modified) and how long the
  server said it stays fresh (Cache-Control max-age). A fresh record is served without any request; a
  stale one is revalidated with a conditional GET, and a 304 Not Modified reuses the decoded entry
  without transferring or decoding the body again. Responses marked ``no-store`` are not recorded.

Values are shared between requests, so their arrays are made read-only when stored. The cache lives on
the event loop (no locks): only the ingestor touches it, never a decoding thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from omnigate.media import Audio, Image, Video
from omnigate_gateway.media.fetch import Validators

Decoded = Audio | Image | Video

_URL_RECORD_OVERHEAD = 256  # bytes charged for a URL record besides the URL itself


@dataclass(frozen=True)
class DecodeKey:
    """What a decoded result depends on: the bytes (by hash) and the decoding options."""

    content: str  # SHA-256 (hex) of the encoded bytes
    modality: str
    options: tuple  # e.g. (target sample rate,), (fit pixels,), (fps, load audio, rate, fit pixels)


@dataclass(frozen=True)
class UrlRecord:
    """What a URL gave last time."""

    content: str  # SHA-256 (hex) of the body
    encoded_bytes: int
    validators: Validators
    fresh_until: float  # on the cache's clock; until then the URL is not asked again


@dataclass
class _Entry:
    value: Decoded | UrlRecord
    size: int
    encoded_bytes: int = 0


class MediaCache:
    """Byte-capped LRU (``max_bytes`` <= 0 disables it: nothing is stored, every lookup misses)."""

    def __init__(self, max_bytes: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max(0, max_bytes)
        self._clock = clock
        self._entries: OrderedDict[object, _Entry] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    # ---- decoded media

    def get_decoded(self, key: DecodeKey) -> tuple[Decoded, int] | None:
        """The decoded value and the size of its encoded bytes, or None."""
        entry = self._get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return entry.value, entry.encoded_bytes  # type: ignore[return-value]

    def put_decoded(self, key: DecodeKey, value: Decoded, encoded_bytes: int) -> None:
        size = decoded_size(value)
        if not self._fits(size):
            return
        _freeze(value)
        self._put(key, _Entry(value, size, encoded_bytes))

    # ---- URL records

    def get_url(self, url: str) -> UrlRecord | None:
        entry = self._get(("url", url))
        return entry.value if entry is not None else None  # type: ignore[return-value]

    def put_url(self, url: str, record: UrlRecord) -> None:
        size = len(url) + _URL_RECORD_OVERHEAD
        if self._fits(size):
            self._put(("url", url), _Entry(record, size))

    def forget_url(self, url: str) -> None:
        entry = self._entries.pop(("url", url), None)
        if entry is not None:
            self.bytes -= entry.size

    def is_fresh(self, record: UrlRecord) -> bool:
        return self._clock() < record.fresh_until

    def fresh_until(self, max_age_s: float | None) -> float:
        return self._clock() + (max_age_s or 0.0)

    # ---- internals

    def _fits(self, size: int) -> bool:
        # One item may not take more than half the cache: a single long video must not flush everything.
        return self.enabled and size <= self.max_bytes // 2

    def _get(self, key: object) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def _put(self, key: object, entry: _Entry) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self._entries[key] = entry
        self.bytes += entry.size
        while self.bytes > self.max_bytes and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.size


def decoded_size(value: Decoded) -> int:
    """Bytes held by a decoded value's arrays."""
    if isinstance(value, Image):
        return value.pixels.nbytes
    if isinstance(value, Audio):
        return value.samples.nbytes
    size = value.frames.nbytes + 8 * len(value.timestamps_s)
    if value.audio is not None:
        size += value.audio.samples.nbytes
    return size


def _freeze(value: Decoded) -> None:
    arrays: list[np.ndarray] = []
    if isinstance(value, Image):
        arrays.append(value.pixels)
    elif isinstance(value, Audio):
        arrays.append(value.samples)
    else:
        arrays.append(value.frames)
        if value.audio is not None:
            arrays.append(value.audio.samples)
    for array in arrays:
        array.flags.writeable = False
